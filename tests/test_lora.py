"""lora.py against independent oracles: closed-form variances and parameter counts, explicit W + s B A algebra,
nn.Linear's own init, and Hugging Face peft loading our export."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn

from conftest import tiny_config
from lora import LoRALinear, apply_lora, export_peft, load_lora, lora_layers, save_lora
from model import Bert, hf_name


def batch_for(cfg, n=3, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # ragged, as the tokenizer pads
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def randomize_lora(model, seed=1):
    """Give B (and the head) non-zero values, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g) * 0.2)


# -----------------------------------------------------------------------------
# A-init variance

@pytest.mark.parametrize("init", ["kaiming_uniform", "gaussian", "xavier_normal"])
@pytest.mark.parametrize("k", [1 / 3, 2.0, 1e-3])
def test_var_A_is_k_over_n_in(init, k):
    n = 1024
    A = LoRALinear(nn.Linear(n, n), rank=n, init=init, init_scale=k, generator=0).lora_A.detach().double()
    assert A.var().item() == pytest.approx(k / n, rel=0.05)
    assert abs(A.mean().item()) < 5 * math.sqrt(k / n) / n  # 5 standard errors of the mean of n^2 entries
    kurtosis = ((A - A.mean()) ** 4).mean().item() / A.var().item() ** 2
    if init == "kaiming_uniform":  # U(-b, b): bounded by b = sqrt(3k/n), kurtosis 9/5
        assert A.abs().max().item() <= math.sqrt(3 * k / n)
        assert kurtosis == pytest.approx(1.8, abs=0.05)
    else:  # normal: kurtosis 3
        assert kurtosis == pytest.approx(3.0, abs=0.1)


def test_default_init_matches_nn_linear_default():
    """k = 1/3 with kaiming_uniform is the reference default: nn.Linear's own init (kaiming_uniform_, a=sqrt(5))."""
    torch.manual_seed(0)
    reference = nn.Linear(1024, 512).weight.detach().double()
    ours = LoRALinear(nn.Linear(1024, 1024), rank=512, generator=0).lora_A.detach().double()
    assert ours.var().item() == pytest.approx(reference.var().item(), rel=0.03)
    assert ours.abs().max().item() == pytest.approx(reference.abs().max().item(), rel=0.01)


def test_init_is_seeded_and_independent_of_global_rng():
    cfg = tiny_config()
    a, b, c = (Bert(cfg) for _ in range(3))
    apply_lora(a, 4, targets="all", generator=7)
    torch.manual_seed(123)  # must not matter
    apply_lora(b, 4, targets="all", generator=7)
    apply_lora(c, 4, targets="all", generator=8)
    for name, m in lora_layers(a).items():
        assert torch.equal(m.lora_A, lora_layers(b)[name].lora_A)
        assert not torch.equal(m.lora_A, lora_layers(c)[name].lora_A)
    a_layers = list(lora_layers(a).values())
    assert not torch.equal(a_layers[0].lora_A, a_layers[2].lora_A)  # one stream, not one draw reused


# -----------------------------------------------------------------------------
# the layer: identity at init, forward formula, merge/unmerge

def test_adapted_model_starts_identical_to_base(tiny_bert):
    tiny_bert.eval()
    batch = batch_for(tiny_bert.cfg)
    before = tiny_bert(**batch)
    apply_lora(tiny_bert, 4, targets="all", generator=0)
    torch.testing.assert_close(tiny_bert(**batch), before)


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_is_w_plus_s_b_a(rslora):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, rank=3, alpha=5, rslora=rslora, generator=0)
    with torch.no_grad():
        layer.lora_B.normal_()
    s = 5 / math.sqrt(3) if rslora else 5 / 3
    x = torch.randn(4, 12)
    expected = x @ (W + s * layer.lora_B.detach() @ layer.lora_A.detach()).T + b
    torch.testing.assert_close(layer(x), expected)


def test_merge_then_unmerge_restores_w_and_forward_agrees(tiny_bert):
    apply_lora(tiny_bert, 4, alpha=8, targets="all", generator=0)
    randomize_lora(tiny_bert)
    tiny_bert.eval()
    batch = batch_for(tiny_bert.cfg)
    unmerged = tiny_bert(**batch)
    layers = lora_layers(tiny_bert)
    W0 = {n: m.base.weight.detach().clone() for n, m in layers.items()}
    for m in layers.values():
        m.merge()
    for n, m in layers.items():  # W <- W + (alpha / r) B A
        torch.testing.assert_close(m.base.weight, W0[n] + 2.0 * m.lora_B @ m.lora_A)
    torch.testing.assert_close(tiny_bert(**batch), unmerged, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="already merged"):
        next(iter(layers.values())).merge()
    for m in layers.values():
        m.unmerge()
    for n, m in layers.items():
        torch.testing.assert_close(m.base.weight, W0[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(tiny_bert(**batch), unmerged, rtol=1e-5, atol=1e-6)


def test_dropout_acts_on_the_lora_path_only():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    layer = LoRALinear(base, rank=4, dropout=0.5, generator=0).train()
    x = torch.randn(64, 16)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: dropout on the side path cannot show
    with torch.no_grad():
        layer.lora_B.normal_()
    assert not torch.equal(layer(x), layer(x))  # the side path is stochastic in train mode
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


# -----------------------------------------------------------------------------
# apply_lora: targets, counts, freezing, errors

def lora_count(r, shapes):
    return sum(r * (n_in + n_out) for n_in, n_out in shapes)


@pytest.mark.parametrize("targets,freeze_a", [("qv", False), ("attn", False), ("all", False), ("all", True)])
def test_counts_and_what_trains(tiny_bert, targets, freeze_a):
    cfg, r = tiny_bert.cfg, 4
    h, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    base_total = sum(p.numel() for p in tiny_bert.parameters())
    per_layer = {"qv": [(h, h)] * 2, "attn": [(h, h)] * 4, "all": [(h, h)] * 4 + [(h, f), (f, h)]}[targets]
    shapes = per_layer * L + ([(h, h)] if targets == "all" else [])  # + pooler
    head = h * cfg.num_labels + cfg.num_labels
    counts = apply_lora(tiny_bert, r, targets=targets, freeze_a=freeze_a, generator=0)
    n_lora = lora_count(r, shapes)
    n_b = sum(r * n_out for _, n_out in shapes)
    assert counts == dict(trainable=(n_b if freeze_a else n_lora) + head, total=base_total + n_lora)
    assert len(lora_layers(tiny_bert)) == len(shapes)
    for name, p in tiny_bert.named_parameters():
        should_train = name.startswith("classifier.") or name.endswith(".lora_B") or \
            (name.endswith(".lora_A") and not freeze_a)
        assert p.requires_grad == should_train, name
    if targets == "qv":
        assert isinstance(tiny_bert.layers[0].attn.query, LoRALinear)
        assert type(tiny_bert.layers[0].attn.key) is nn.Linear


def test_full_rank_allowed_and_out_of_range_rank_is_one_clear_error():
    cfg = tiny_config()  # hidden 32, intermediate 64: "all" allows 1..32
    apply_lora(Bert(cfg), 32, targets="all", generator=0)
    for bad in (0, -1, 33, 2.5, True):
        with pytest.raises(ValueError, match=r"--rank .* 1\.\.32"):
            apply_lora(Bert(cfg), bad, targets="all")
    with pytest.raises(ValueError, match=r"--rank 5 .* 1\.\.4"):
        LoRALinear(nn.Linear(4, 8), rank=5)


def test_bad_arguments_are_clear_errors(tiny_bert):
    with pytest.raises(ValueError, match="--targets"):
        apply_lora(tiny_bert, 4, targets="everything")
    with pytest.raises(ValueError, match="--init"):
        apply_lora(tiny_bert, 4, init="svd")
    with pytest.raises(ValueError, match="--init-scale"):
        apply_lora(tiny_bert, 4, init_scale=0)
    apply_lora(tiny_bert, 4)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(tiny_bert, 4)


# -----------------------------------------------------------------------------
# saving, loading, peft export

def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    base = Bert(tiny_config()).eval()
    trained, fresh = copy.deepcopy(base), copy.deepcopy(base)
    apply_lora(trained, 4, targets="attn", generator=0)
    randomize_lora(trained)
    path = str(tmp_path / "adapter.safetensors")
    save_lora(trained, path)
    apply_lora(fresh, 4, targets="attn", generator=1)  # different A: the file must overwrite it
    load_lora(fresh, path)
    batch = batch_for(base.cfg)
    torch.testing.assert_close(fresh(**batch), trained(**batch))

    other_rank = copy.deepcopy(base)
    apply_lora(other_rank, 2, targets="attn")
    with pytest.raises(ValueError, match="rank"):
        load_lora(other_rank, path)
    other_targets = copy.deepcopy(base)
    apply_lora(other_targets, 4, targets="qv")
    with pytest.raises(ValueError, match="differ"):
        load_lora(other_targets, path)


def write_hf_folder(model, folder):
    """Our Bert as a Hugging Face BertForSequenceClassification folder (config.json + model.safetensors)."""
    from dataclasses import asdict

    from safetensors.torch import save_file
    folder.mkdir()
    save_file({hf_name(n): t.contiguous() for n, t in model.state_dict().items()}, str(folder / "model.safetensors"))
    cfg = asdict(model.cfg)
    cfg.update(model_type="bert", architectures=["BertForSequenceClassification"])
    (folder / "config.json").write_text(json.dumps(cfg))


def test_export_peft_loads_in_peft_and_reproduces_logits(tmp_path):
    transformers = pytest.importorskip("transformers", reason="export check needs transformers (requirements-dev)")
    peft = pytest.importorskip("peft", reason="export check needs peft: pip install peft (test-only)")
    torch.manual_seed(0)
    model = Bert(tiny_config()).eval()
    write_hf_folder(model, tmp_path / "base")
    apply_lora(model, 4, alpha=8, targets="all", generator=0)
    randomize_lora(model)
    export_peft(model, str(tmp_path / "adapter"), base_model_path=str(tmp_path / "base"))

    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.classifier.weight" in keys

    hf = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "base")).eval()
    adapted = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    batch = batch_for(model.cfg)
    with torch.no_grad():
        theirs = adapted(**batch).logits
        ours = model(**batch)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    plain = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "base")).eval()
    with torch.no_grad():  # the adapter (B != 0, trained head) really changes the base's output
        assert (plain(**batch).logits - theirs).abs().max() > 1e-2

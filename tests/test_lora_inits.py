"""The LoRA init zoo (issue 12: pissa, mica, olora, orthogonal, dora) against two independent oracles: float64
SVD/QR for what each method promises, and Hugging Face peft 0.21.2 on transformers' BERT for everything else (the
same initial factors and residual base, the same training trajectory, our peft export reloaded on the original base).

SVD/QR factors are unique only up to the sign of each direction: the tests fix that sign from B and apply it to A,
so a wrong pairing still fails, or compare sign-free products (B A, the residual W, projectors)."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import tiny_config
from lora import LoRALinear, apply_lora, export_peft, load_lora, lora_layers, orthogonal_factors, save_lora
from model import Bert, hf_name
from test_lora import batch_for, write_hf_folder

ZOO = ("pissa", "mica", "olora", "orthogonal", "dora")
RANK, ALPHA = 4, 8  # s = 2: PiSSA divides it out of its factors, OLoRA does not; both must still be exact
LABELS = torch.tensor([0, 1, 1])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(our tiny Bert, the same weights as a Hugging Face folder); hidden 32 and intermediate 64 with targets "all"
    give square, wide and tall layers."""
    torch.manual_seed(0)
    model = Bert(tiny_config()).eval()
    folder = tmp_path_factory.mktemp("zoo") / "base"
    write_hf_folder(model, folder)
    return model, str(folder)


def adapted(model, init, generator=0, **kw):
    model = copy.deepcopy(model)
    apply_lora(model, RANK, ALPHA, targets="all", init=init, generator=generator, **kw)
    return model.eval()


def peft_adapted(folder, init, ours):
    """peft's own init of the same layers on transformers' BertForSequenceClassification."""
    transformers = pytest.importorskip("transformers", reason="needs transformers (requirements-dev)")
    peft = pytest.importorskip("peft", reason="needs peft (requirements-dev)")
    hf = transformers.BertForSequenceClassification.from_pretrained(folder)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="SEQ_CLS",
                             target_modules=[hf_name(n) for n in lora_layers(ours)], modules_to_save=["classifier"],
                             init_lora_weights=True if init == "dora" else init, use_dora=init == "dora")
    return peft.get_peft_model(hf, config).eval()


def peft_layer(theirs, name):
    return theirs.get_submodule(f"base_model.model.{hf_name(name)}")


def assert_same_up_to_sign(A, B, A_ref, B_ref, atol):
    """B = B_ref D and A = D A_ref for one diagonal D of signs, which is read off B."""
    sign = torch.sign((B * B_ref).sum(0))
    torch.testing.assert_close(B * sign, B_ref, rtol=0, atol=atol)
    torch.testing.assert_close(A * sign[:, None], A_ref, rtol=0, atol=atol)


def logits(model, batch):
    out = model(**batch)
    return getattr(out, "logits", out)


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -----------------------------------------------------------------------------
# what each method promises, against float64 SVD/QR of the original weight

@pytest.mark.parametrize("init", ZOO)
def test_factors_against_float64_decompositions(base, init):
    model, _ = base
    W0 = {n: m.weight.detach().double() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, m in lora_layers(adapted(model, init)).items():
        W, A, B, res, s = W0[name], m.lora_A.double(), m.lora_B.double(), m.base.weight.double(), m.scaling
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        close = dict(rtol=0, atol=1e-6)
        if init in ("pissa", "olora"):  # the base is the residual and the buffers hold the initial factors
            torch.testing.assert_close(res + s * B @ A, W, **close)
            assert torch.equal(m.lora_A0, m.lora_A) and torch.equal(m.lora_B0, m.lora_B)
        else:
            assert torch.equal(m.base.weight.double(), W)
        if init == "pissa":  # s B A = the top-r part of the spectrum, split evenly between B and A
            torch.testing.assert_close(s * B @ A, U[:, :RANK] @ torch.diag(S[:RANK]) @ Vh[:RANK], **close)
            torch.testing.assert_close(B.T @ B, A @ A.T, **close)
        elif init == "olora":  # B = Q_r orthonormal, A = R_r upper trapezoidal, B A = W's first r QR components
            Q, R = torch.linalg.qr(W)
            torch.testing.assert_close(B.T @ B, torch.eye(RANK, dtype=W.dtype), **close)
            assert torch.equal(A.tril(-1), torch.zeros_like(A))
            torch.testing.assert_close(B @ A, Q[:, :RANK] @ R[:RANK], **close)
        elif init == "mica":  # B spans the r minor left singular directions, frozen; A = 0 trains
            torch.testing.assert_close(B @ B.T, U[:, -RANK:] @ U[:, -RANK:].T, rtol=0, atol=1e-5)
            torch.testing.assert_close(B.T @ B, torch.eye(RANK, dtype=W.dtype), **close)
            assert not A.any() and not m.lora_B.requires_grad and m.lora_A.requires_grad
        elif init == "orthogonal":  # both factors non-zero, yet B A = 0
            assert A.abs().min() > 0 and B.abs().min() > 0
            assert (B @ A).abs().max() < 1e-5 * (B.abs() @ A.abs()).max()  # float32 rounding of an exact 0
        else:  # dora: m = ||W|| per output row, B = 0
            torch.testing.assert_close(m.lora_magnitude.double(), W.norm(dim=1), **close)
            assert not B.any()


@pytest.mark.parametrize("init", ZOO)
def test_model_starts_at_the_base_output(base, init):
    model, _ = base
    batch = batch_for(model.cfg)
    ours = adapted(model, init)
    if init in ("pissa", "olora"):  # not vacuous: the base weights did change
        assert any(not torch.equal(m.base.weight, model.get_submodule(n).weight) for n, m in lora_layers(ours).items())
    torch.testing.assert_close(logits(ours, batch), logits(model, batch), rtol=1e-5, atol=1e-6)


def test_dora_forward_is_the_rescaled_weight():
    """DoRA Eq. (5) by explicit algebra: y = m (W + s B A) x / ||W + s B A||_row + b."""
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, rank=3, alpha=5, init="dora", generator=0)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(torch.linspace(0.5, 2, 7))
    V = W + 5 / 3 * layer.lora_B.detach() @ layer.lora_A.detach()
    x = torch.randn(4, 12)
    expected = x @ (layer.lora_magnitude.detach()[:, None] * V / V.norm(dim=1, keepdim=True)).T + b
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("init", ZOO)
def test_merge_then_unmerge(base, init):
    model, _ = base
    batch = batch_for(model.cfg)
    ours = train(adapted(model, init), batch)
    before = logits(ours, batch)
    W = {n: m.base.weight.detach().clone() for n, m in lora_layers(ours).items()}
    for m in lora_layers(ours).values():
        m.merge()
    torch.testing.assert_close(logits(ours, batch), before, rtol=1e-5, atol=1e-6)
    for n, m in lora_layers(ours).items():
        m.unmerge()
        torch.testing.assert_close(m.base.weight, W[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(ours, batch), before, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# the same initial state as peft's

@pytest.mark.parametrize("init", ["pissa", "olora", "mica"])
def test_weight_inits_match_peft(base, init):
    model, folder = base
    ours = adapted(model, init)
    theirs = peft_adapted(folder, init, ours)
    for name, m in lora_layers(ours).items():
        p = peft_layer(theirs, name)
        A, B = p.lora_A["default"].weight, p.lora_B["default"].weight
        assert_same_up_to_sign(m.lora_A, m.lora_B, A, B, atol=1e-4 if init == "mica" else 2e-5)
        torch.testing.assert_close(m.base.weight, p.base_layer.weight, rtol=0, atol=1e-6)  # the residual
        assert (m.lora_A.requires_grad, m.lora_B.requires_grad) == (A.requires_grad, B.requires_grad)
    assert n_trainable(ours) == n_trainable(theirs)


def test_orthogonal_init_matches_peft_draw_for_draw(base):
    """peft draws from the global RNG; one seed there and our generator with that seed give the same factors."""
    model, folder = base
    ours = adapted(model, "orthogonal")
    theirs = peft_adapted(folder, "orthogonal", ours)
    for seed, (name, m) in enumerate(lora_layers(ours).items()):
        p = peft_layer(theirs, name)
        torch.manual_seed(seed)
        p.orthogonal_init("default")
        A, B = orthogonal_factors(m.in_features, m.out_features, RANK, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(A, p.lora_A["default"].weight, rtol=0, atol=0)
        torch.testing.assert_close(B, p.lora_B["default"].weight, rtol=0, atol=0)
        assert torch.equal(p.base_layer.weight, model.get_submodule(name).weight)  # peft leaves the base too


def test_dora_magnitude_matches_peft(base):
    model, folder = base
    ours = adapted(model, "dora", generator=3)
    kaiming = adapted(model, "kaiming_uniform", generator=3)
    theirs = peft_adapted(folder, "dora", ours)
    for name, m in lora_layers(ours).items():
        p = peft_layer(theirs, name)
        torch.testing.assert_close(m.lora_magnitude, p.lora_magnitude_vector["default"].weight, rtol=1e-6, atol=0)
        assert torch.equal(m.lora_A, lora_layers(kaiming)[name].lora_A) and not m.lora_B.any()
    assert n_trainable(ours) == n_trainable(theirs)


# -----------------------------------------------------------------------------
# the same training, and our export reloaded by peft on the original base

def train(model, batch, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(logits(model, batch), LABELS).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def trained(base):
    """init -> (our model, peft's model), both after 3 AdamW steps on one batch (dropout off: eval mode).
    Random-A inits (orthogonal, dora) start peft from our draws; the weight inits start it from its own."""
    model, folder = base
    batch, cache = batch_for(model.cfg), {}

    def get(init):
        if init not in cache:
            ours = adapted(model, init)
            theirs = peft_adapted(folder, init, ours)
            if init in ("orthogonal", "dora"):
                with torch.no_grad():
                    for name, m in lora_layers(ours).items():
                        peft_layer(theirs, name).lora_A["default"].weight.copy_(m.lora_A)
                        peft_layer(theirs, name).lora_B["default"].weight.copy_(m.lora_B)
            cache[init] = train(ours, batch), train(theirs, batch)
        return cache[init]
    return get


@pytest.mark.parametrize("init", ZOO)
def test_training_matches_peft(base, trained, init):
    model, _ = base
    batch = batch_for(model.cfg)
    ours, theirs = trained(init)
    with torch.no_grad():
        ours_out = logits(ours, batch)
        torch.testing.assert_close(ours_out, logits(theirs, batch), rtol=1e-4, atol=1e-4)
        assert (ours_out - logits(model, batch)).abs().max() > 1e-2  # the steps did move the model


@pytest.mark.parametrize("init", ZOO)
def test_export_peft_on_the_original_base(base, trained, init, tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs transformers (requirements-dev)")
    peft = pytest.importorskip("peft", reason="needs peft (requirements-dev)")
    model, folder = base
    ours = trained(init)[0]
    if init in ("pissa", "olora"):  # B moved away from B0, so the conversion's -B0 half matters
        assert all((m.lora_B - m.lora_B0).abs().max() > 1e-3 for m in lora_layers(ours).values())
    export_peft(ours, str(tmp_path / "adapter"), base_model_path=folder)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    doubled = init in ("pissa", "olora")
    assert (config["r"], config["lora_alpha"]) == ((2 * RANK, 2 * ALPHA) if doubled else (RANK, ALPHA))
    assert config["use_dora"] == (init == "dora")
    hf = transformers.BertForSequenceClassification.from_pretrained(folder).eval()  # the ORIGINAL weights
    reloaded = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    batch = batch_for(model.cfg)
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded, batch), logits(ours, batch), rtol=1e-5, atol=1e-5)


def test_export_of_a_residual_init_keeps_the_rslora_scaling(base, tmp_path):
    """With rsLoRA, s = alpha / sqrt(r): the rank-2r conversion needs alpha * sqrt 2, not 2 alpha."""
    transformers = pytest.importorskip("transformers", reason="needs transformers (requirements-dev)")
    peft = pytest.importorskip("peft", reason="needs peft (requirements-dev)")
    model, folder = base
    batch = batch_for(model.cfg)
    ours = train(adapted(model, "olora", rslora=True), batch)
    export_peft(ours, str(tmp_path / "adapter"), base_model_path=folder)
    hf = transformers.BertForSequenceClassification.from_pretrained(folder).eval()
    reloaded = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded, batch), logits(ours, batch), rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# save/load, errors

@pytest.mark.parametrize("init", ZOO)
def test_save_load_rebuilds_the_model(base, init, tmp_path):
    model, _ = base
    batch, path = batch_for(model.cfg), str(tmp_path / "adapter.safetensors")
    ours = train(adapted(model, init), batch)
    save_lora(ours, path)
    fresh = adapted(model, init, generator=1)  # another draw of A / B: the file must overwrite it
    load_lora(fresh, path)
    assert torch.equal(logits(fresh, batch), logits(ours, batch))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_load_rebases_onto_the_files_initial_factors(base, init, tmp_path):
    """A model whose init factors differ from the file's (another machine's SVD/QR) is rebuilt from the file's."""
    model, _ = base
    batch, path = batch_for(model.cfg), str(tmp_path / "adapter.safetensors")
    ours = train(adapted(model, init), batch)
    save_lora(ours, path)
    fresh = adapted(model, init)
    g = torch.Generator().manual_seed(0)
    for m in lora_layers(fresh).values():  # the same W, split another way: W - s B0' A0' with B0' A0' != B0 A0
        m._rebase(m.lora_A0 + 0.1 * torch.randn(m.lora_A0.shape, generator=g), m.lora_B0 * 1.5)
    load_lora(fresh, path)
    torch.testing.assert_close(logits(fresh, batch), logits(ours, batch), rtol=1e-5, atol=1e-6)


def test_loading_into_another_init_is_one_clear_error(base, tmp_path):
    model, _ = base
    path = str(tmp_path / "adapter.safetensors")
    save_lora(adapted(model, "pissa"), path)
    with pytest.raises(ValueError, match="--init pissa .* --init olora"):
        load_lora(adapted(model, "olora"), path)


def test_bad_flag_combinations_are_clear_errors(base):
    model, _ = base
    for init, rank, kw, flag in [("orthogonal", 3, {}, "--rank 3 must be even"),
                                 ("pissa", RANK, dict(init_scale=2.0), "--init-scale"),
                                 ("mica", RANK, dict(freeze_a=True), "--freeze-a"),
                                 ("svd", RANK, {}, "--init 'svd' is not one of")]:
        fresh = copy.deepcopy(model)
        with pytest.raises(ValueError, match=flag):
            apply_lora(fresh, rank, targets="all", init=init, **kw)
        assert not lora_layers(fresh)  # rejected before any weight changed
    with pytest.raises(ValueError, match=r"--rank 33 .* 1\.\.32"):
        apply_lora(copy.deepcopy(model), 33, targets="all", init="pissa")


def test_freeze_a_keeps_the_initial_a(base):
    model, _ = base
    ours = train(adapted(model, "pissa", freeze_a=True), batch_for(model.cfg), steps=1)
    for m in lora_layers(ours).values():
        assert torch.equal(m.lora_A, m.lora_A0) and not torch.equal(m.lora_B, m.lora_B0)


def test_bfloat16_weights_decompose_in_float64():
    torch.manual_seed(0)
    base = nn.Linear(48, 24).to(torch.bfloat16)
    W = base.weight.detach().double()
    layer = LoRALinear(base, rank=4, alpha=8, init="pissa")
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.base.weight.dtype == torch.bfloat16
    rebuilt = layer.base.weight.double() + 2 * layer.lora_B.double() @ layer.lora_A.double()
    torch.testing.assert_close(rebuilt, W, rtol=0, atol=2e-3)  # one bfloat16 rounding of the residual

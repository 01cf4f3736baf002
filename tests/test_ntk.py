"""ntk.py and the paper's theory (Lemma 3.1, Thm 3.3, Thm 3.4, Cor. 3.5, Eq. 7-10, 18) against independent oracles:
per-sample torch.autograd.grad loops, explicit P x P matrices, closed forms and random-matrix facts."""
import csv
import math

import pytest
import torch
import torch.nn as nn

import ntk
from conftest import tiny_config
from lora import LoRALinear, apply_lora, lora_layers
from model import Bert




@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny; on a shared 2-core machine multi-threaded kernels (LAPACK's eigvalsh above all)
    spend far more time in thread synchronisation than in arithmetic, so run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# oracles and fixtures

def naive_rows(model, x, names, labels=None):
    """The oracle: one forward per sample, torch.autograd.grad per output (or of the CE loss), flattened over
    `names` in order -> (N, C, P) Jacobians, or (N, P) loss gradients."""
    named = dict(model.named_parameters())
    ps = [named[n] for n in names]
    flags = [p.requires_grad for p in ps]
    for p in ps:
        p.requires_grad_(True)
    model.eval()
    n = x["input_ids"].shape[0] if isinstance(x, dict) else x.shape[0]
    rows = []
    for i in range(n):
        out = model(**{k: v[i:i + 1] for k, v in x.items()}) if isinstance(x, dict) else model(x[i:i + 1])
        if labels is not None:
            loss = nn.functional.cross_entropy(out, labels[i:i + 1])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, ps)]))
        else:
            rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[0, c], ps,
                                                                                           retain_graph=True)])
                                     for c in range(out.shape[1])]))
    for p, f in zip(ps, flags):
        p.requires_grad_(f)
    return torch.stack(rows).detach()


def tiny_batch(n, t=8, seed=0, vocab=120):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, t), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, n, 2):
        mask[i, t - 1 - i % t:] = 0  # ragged padding
    types = torch.zeros_like(ids)
    types[:, t // 2:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


@pytest.fixture
def lora_bert():
    """A float64 tiny BERT with LoRA on q/v whose B is non-zero, so that A's gradient is not trivially zero."""
    torch.manual_seed(0)
    model = Bert(tiny_config()).double().eval()
    apply_lora(model, 2, targets="qv", generator=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=torch.float64) * 0.3)
    return model


class MLP(nn.Module):
    """x -> tanh(l1 x) = h -> l2 (the adapted layer l, bias-free) -> tanh -> l3 -> logits."""

    def __init__(self, d0, n, m, c):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(d0, n), nn.Linear(n, m, bias=False), nn.Linear(m, c)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


# -----------------------------------------------------------------------------
# the machinery against autograd loops

@pytest.mark.parametrize("which", ["ff", "lora"])
def test_ntk_equals_per_sample_autograd_loop_on_tiny_bert(lora_bert, which):
    x1, x2 = tiny_batch(3, seed=0), tiny_batch(4, seed=1)
    names = list(ntk.params_for(lora_bert, which))
    J1, J2 = naive_rows(lora_bert, x1, names), naive_rows(lora_bert, x2, names)
    expected = torch.einsum("icp,jdp->ijcd", J1, J2)
    K = ntk.empirical_ntk(lora_bert, x1, x2, params=which)
    assert K.shape == (3, 4, 2, 2)
    torch.testing.assert_close(K, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_chunking_train_mode_and_self_kernel(lora_bert):
    """Several parameter chunks and sample chunks give the same kernel; a model in train() mode is evaluated
    without dropout and handed back in train() mode."""
    x = tiny_batch(5, seed=2)
    names = list(ntk.params_for(lora_bert, "lora"))
    J = naive_rows(lora_bert, x, names)
    expected = torch.einsum("icp,jdp->ijcd", J, J)
    lora_bert.train()
    K = ntk.empirical_ntk(lora_bert, x, params="lora", sample_chunk=2, max_bytes=5 * 2 * 8 * 200)
    assert lora_bert.training
    torch.testing.assert_close(K, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_fisher_gram_route_equals_explicit_p_by_p_matrix(lora_bert):
    x, y = tiny_batch(6, seed=3), torch.tensor([0, 1, 1, 0, 1, 0])
    names = list(ntk.params_for(lora_bert, "lora"))
    g = naive_rows(lora_bert, x, names, labels=y)  # (N, P), P = 578
    F = g.T @ g / len(y)  # the P x P empirical Fisher, Eq. 8
    top = torch.linalg.eigvalsh(F).flip(0)[:6].clamp_min(0)
    eigs = ntk.fisher_spectrum(lora_bert, x, y, params="lora", sample_chunk=4, max_bytes=6 * 8 * 300)
    torch.testing.assert_close(eigs, top, rtol=1e-6, atol=1e-10 * top[0].item())
    assert torch.all(eigs[:-1] >= eigs[1:])
    x["labels"] = y  # labels may ride in the batch, as train.py's batches carry them
    torch.testing.assert_close(ntk.fisher_spectrum(lora_bert, x, params="lora"), eigs)


def test_model_fisher_matches_its_expectation_on_average():
    """kind="model" draws y ~ softmax(f(x)); averaged over draws its trace must approach the exact model Fisher's
    trace (1/N) sum_i tr(J_i^T (diag p_i - p_i p_i^T) J_i), computed here from autograd Jacobians."""
    torch.manual_seed(0)
    model = MLP(5, 16, 12, 3).double()
    x = torch.randn(24, 5, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    J = naive_rows(model, x, names)  # (N, C, P)
    p = model(x).softmax(-1).detach()
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    exact = torch.einsum("icp,icd,idp->", J, H, J).item() / len(x)
    traces = [ntk.fisher_spectrum(model, x, params="ff", kind="model",
                                  generator=torch.Generator().manual_seed(s)).sum().item() for s in range(40)]
    assert sum(traces) / len(traces) == pytest.approx(exact, rel=0.1)
    y = torch.zeros(24, dtype=torch.long)
    empirical = ntk.fisher_spectrum(model, x, y, params="ff").sum().item()
    assert empirical == pytest.approx((naive_rows(model, x, names, y) ** 2).sum().item() / 24, rel=1e-9)


def test_m_prime_and_gradient_alignment_against_loops():
    torch.manual_seed(0)
    model = MLP(6, 10, 8, 2).double()
    clean = torch.randn(7, 6, dtype=torch.float64)
    poisoned = clean + 0.5 * torch.randn(7, 6, dtype=torch.float64)
    y, y_flip = torch.randint(0, 2, (7,)), torch.randint(0, 2, (7,))
    names = [n for n, _ in model.named_parameters()]
    J, Jt = naive_rows(model, clean, names), naive_rows(model, poisoned, names)
    expected = torch.linalg.matrix_norm(torch.einsum("icp,idp->cd", J, Jt) / 7)  # Eq. 7
    assert ntk.m_prime(model, clean, poisoned).item() == pytest.approx(expected.item(), rel=1e-9)
    g, gt = naive_rows(model, clean, names, y), naive_rows(model, poisoned, names, y_flip)
    torch.testing.assert_close(ntk.gradient_alignment(model, clean, y, poisoned, y_flip), (g * gt).sum(-1))


def test_bad_inputs_are_clear_errors(lora_bert):
    x = tiny_batch(3)
    with pytest.raises(ValueError, match="not one of"):
        ntk.params_for(lora_bert, "everything")
    with pytest.raises(ValueError, match="no LoRA layers"):
        ntk.params_for(Bert(tiny_config()), "lora")
    with pytest.raises(ValueError, match="true labels"):
        ntk.fisher_spectrum(lora_bert, x)
    with pytest.raises(ValueError, match="labels=None"):
        ntk.fisher_spectrum(lora_bert, x, torch.tensor([0, 1, 0]), kind="model")
    with pytest.raises(ValueError, match="kind"):
        ntk.fisher_spectrum(lora_bert, x, torch.tensor([0, 1, 0]), kind="true")
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        ntk.fisher_spectrum(lora_bert, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="not in the model"):
        ntk.empirical_ntk(lora_bert, x, params={"nope": torch.zeros(1)})


# -----------------------------------------------------------------------------
# IB (Eq. 9) and Renyi entropy (Eq. 10) in closed form

def test_information_bits_is_half_log_pseudo_determinant():
    eigs = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0, 1e-20])
    assert ntk.information_bits(eigs) == pytest.approx(0.5 * math.log(4 * 2 * 1 * 0.5))
    assert ntk.information_bits(eigs, tol=0.75) == pytest.approx(0.5 * math.log(8))
    with pytest.raises(ValueError, match="numerically zero"):
        ntk.information_bits(torch.zeros(3))


def test_renyi_entropy_closed_forms():
    p = torch.tensor([0.5, 0.25, 0.25, 0.0])
    for scale in (1.0, 37.0):  # normalised: the scale of the spectrum does not matter
        lam = scale * p
        assert ntk.renyi_entropy(lam, 0) == pytest.approx(math.log(3))
        assert ntk.renyi_entropy(lam, 0.5) == pytest.approx(2 * math.log(math.sqrt(0.5) + 2 * math.sqrt(0.25)))
        assert ntk.renyi_entropy(lam, 1) == pytest.approx(1.5 * math.log(2))
        assert ntk.renyi_entropy(lam, 2) == pytest.approx(-math.log(0.25 + 2 * 0.0625))
        assert ntk.renyi_entropy(lam, math.inf) == pytest.approx(math.log(2))
    for a in (1 - 1e-6, 1 + 1e-6):  # Shannon is the alpha -> 1 limit (App. C.1)
        assert ntk.renyi_entropy(p, a) == pytest.approx(1.5 * math.log(2), abs=1e-5)
    assert ntk.renyi_entropy(torch.ones(7), 2) == pytest.approx(math.log(7))
    with pytest.raises(ValueError, match="alpha"):
        ntk.renyi_entropy(p, -1)


# -----------------------------------------------------------------------------
# Lemma 3.1 / Theorem 3.3: K_LoRA - K_FF in closed form

@pytest.mark.parametrize("rank,alpha,rslora", [(3, 6, False), (8, 8, True)])
def test_lemma_3_1_thm_3_3_closed_form(rank, alpha, rslora):
    """Layer l = l2 (bias-free) of an MLP, at initialisation (B = 0). Everything else (l1 before it, as OOLD
    assumes, and l3 after it) is trained in both cases, so the whole-network NTKs differ only through layer l:

        K_LoRA(x, x') - K_FF(x, x') = G(x) G(x')^T * (s^2 h^T A^T A h' - h^T h')        (Thm 3.3, Eq. 15)

    h = tanh(l1 x) is layer l's input, G = dF/dy_l = W3 diag(1 - tanh^2(y_l)) its output Jacobian, s the LoRA
    scaling (the paper takes s = 1). Per layer: K_FF^(l) = G G'^T h^T h' (Eq. 12, w.r.t. W) and
    K_LoRA^(l) = G G'^T s^2 h^T A^T A h' (Eq. 14, w.r.t. A and B: A's own gradient s B^T(..) is zero at B = 0).
    """
    torch.manual_seed(0)
    model = MLP(5, 24, 16, 3).double()
    W1, b1, W2, W3 = (t.detach().clone() for t in (model.l1.weight, model.l1.bias, model.l2.weight, model.l3.weight))
    model.l2 = LoRALinear(model.l2, rank, alpha, init="gaussian", init_scale=1.0, rslora=rslora, generator=0)
    A = model.l2.lora_A.detach()
    s = alpha / math.sqrt(rank) if rslora else alpha / rank
    x = torch.randn(6, 5, dtype=torch.float64)

    h = torch.tanh(x @ W1.T + b1)
    G = W3[None] * (1 - torch.tanh(h @ W2.T) ** 2)[:, None, :]  # (N, C, m)
    GG = torch.einsum("icm,jdm->ijcd", G, G)
    ff_l = GG * (h @ h.T)[:, :, None, None]
    lora_l = GG * (s ** 2 * (h @ A.T) @ (h @ A.T).T)[:, :, None, None]

    shared = {n: p.detach() for n, p in model.named_parameters() if n.startswith(("l1.", "l3."))}
    layer_ff = {"l2.base.weight": model.l2.base.weight.detach()}
    layer_lora = {"l2.lora_A": A, "l2.lora_B": model.l2.lora_B.detach()}
    K_ff = ntk.empirical_ntk(model, x, params={**shared, **layer_ff})
    K_lora = ntk.empirical_ntk(model, x, params={**shared, **layer_lora})
    tol = dict(rtol=0, atol=1e-5 * ff_l.abs().max().item())
    torch.testing.assert_close(K_lora - K_ff, lora_l - ff_l, **tol)
    torch.testing.assert_close(ntk.empirical_ntk(model, x, params=layer_ff), ff_l, **tol)
    torch.testing.assert_close(ntk.empirical_ntk(model, x, params=layer_lora), lora_l, **tol)
    assert (lora_l - ff_l).abs().max() > 1e-2 * ff_l.abs().max()  # not a comparison of zeros


# -----------------------------------------------------------------------------
# Corollary 3.5: full rank, Var(A) = 1/n -> the LoRA NTK approaches the FF NTK as the width grows

def layer_ntk_error(n, rank, k, seed):
    """||K_LoRA^(l) - K_FF^(l)||_F / ||K_FF^(l)||_F for a width-n layer l (n -> n) of an MLP at init, alpha = r
    (s = 1, as the paper). The LoRA kernel is taken w.r.t. B alone: A's gradient is exactly zero at B = 0
    (shown in the Lemma 3.1 test), and A is n x n here."""
    torch.manual_seed(seed)
    model = MLP(8, n, n, 1)
    model.l2 = LoRALinear(model.l2, rank, alpha=rank, init="gaussian", init_scale=k, generator=seed)
    x = torch.randn(8, 8)
    K_ff = ntk.empirical_ntk(model, x, params={"l2.base.weight": model.l2.base.weight.detach()})
    K_lora = ntk.empirical_ntk(model, x, params={"l2.lora_B": model.l2.lora_B.detach()})
    return (torch.linalg.norm(K_lora - K_ff) / torch.linalg.norm(K_ff)).item()


def test_cor_3_5_full_rank_lora_ntk_approaches_ff_as_width_grows():
    err = {n: sum(layer_ntk_error(n, n, 1.0, s) for s in range(3)) / 3 for n in (256, 2048)}
    print(f"Cor. 3.5 relative Frobenius error: n=256 {err[256]:.4f}, n=2048 {err[2048]:.4f}, "
          f"ratio {err[256] / err[2048]:.2f} (1/sqrt(n) predicts {math.sqrt(8):.2f})")
    assert err[256] < 0.25 and err[2048] < 0.08
    assert 1.8 < err[256] / err[2048] < 4.5  # ~ sqrt(2048 / 256) = 2.83: the quadratic forms concentrate as 1/sqrt(n)
    # the test can fail: low rank or small variance are far from FF (K_LoRA ~ (r k / n) K_FF in expectation)
    assert layer_ntk_error(256, 32, 1.0, 0) == pytest.approx(1 - 32 / 256, abs=0.1)
    assert layer_ntk_error(256, 256, 0.01, 0) == pytest.approx(0.99, abs=0.02)


def test_cor_3_5_holds_for_quadratic_forms_not_for_the_matrix():
    """What converges is h^T A^T A h' for given h, h' (all the NTK sees), not A^T A itself: with r = n and
    Var(A) = 1/n, A^T A's spectrum fills the Marchenko-Pastur law on [0, 4], so ||A^T A - I||_op stays near 3
    at every width, contrary to the paper's 'M_Delta strictly converges to 0'."""
    for n in (256, 1024):
        A = LoRALinear(nn.Linear(n, n), rank=n, init="gaussian", init_scale=1.0, generator=n).lora_A.double()
        M = A.detach().T @ A.detach() - torch.eye(n, dtype=torch.float64)
        assert torch.linalg.matrix_norm(M, ord=2).item() > 2.5


# -----------------------------------------------------------------------------
# Theorem 3.4, stated as it actually holds

def draw_A(rank, n, k, init="gaussian", seed=0):
    return LoRALinear(nn.Linear(n, n), rank, init=init, init_scale=k, generator=seed).lora_A.detach().double()


@pytest.mark.parametrize("init", ["kaiming_uniform", "gaussian"])
def test_thm_3_4_rank_and_expectation(init):
    n = 32
    for r in (3, 16, 32):  # rank(A^T A) = min(r, n) = r (A has i.i.d. continuous entries)
        A = draw_A(r, n, 1 / 3, init, seed=r)
        assert torch.linalg.matrix_rank(A.T @ A).item() == r
    # E[A^T A] = r Var(A) I (the paper's Eq. 35-36, which are right): Monte Carlo over M draws
    r, k, M = 8, 0.5, 400
    g = torch.Generator().manual_seed(0)
    mean = sum((lambda A: A.T @ A)(
        LoRALinear(nn.Linear(n, n), r, init=init, init_scale=k, generator=g).lora_A.detach().double())
        for _ in range(M)) / M
    var = k / n
    se = math.sqrt(2 * r / M) * var  # standard error of a diagonal entry (off-diagonal ones are smaller)
    assert (mean - r * var * torch.eye(n, dtype=torch.float64)).abs().max().item() < 5 * se


def test_thm_3_4_eigenvalues_follow_marchenko_pastur_not_a_point_mass():
    """The r non-zero eigenvalues of A^T A average n Var(A) = k (the paper's A.4 is right about the mean), but
    for r/n = c > 0 they spread over k (1 -+ sqrt(c))^2 (Marchenko-Pastur); they concentrate at k only if r << n."""
    n, r, k = 1024, 256, 0.5
    A = draw_A(r, n, k)
    lam = torch.linalg.eigvalsh(A @ A.T)  # = the non-zero eigenvalues of A^T A
    c = r / n
    assert lam.mean().item() == pytest.approx(k, rel=0.02)
    assert lam.max().item() == pytest.approx(k * (1 + math.sqrt(c)) ** 2, rel=0.05)
    assert lam.min().item() == pytest.approx(k * (1 - math.sqrt(c)) ** 2, rel=0.15)


def test_thm_3_4_negative_semi_definiteness_condition():
    """M = A^T A - I is NSD iff lambda_max(A^T A) <= 1, i.e. for large n iff k (1 + sqrt(r/n))^2 <= 1. The
    paper's condition Var(A) < 1/n (k < 1) is not sufficient, and M's n - r zero directions have eigenvalue -1,
    not 0 as the theorem states."""
    n, r = 1024, 256
    I = torch.eye(n, dtype=torch.float64)
    A = draw_A(r, n, 0.9)  # Var(A) = 0.9 / n < 1 / n, yet lambda_max ~ 0.9 * 2.25 ~ 2
    assert torch.linalg.eigvalsh(A.T @ A - I).max().item() > 0.5
    A = draw_A(r, n, 1 / 3)  # the default k: 1/3 * 2.25 = 0.75 < 1 -> NSD
    eig = torch.linalg.eigvalsh(A.T @ A - I)
    assert eig.max().item() < 0
    assert ((eig + 1).abs() < 1e-9).sum().item() == n - r


# -----------------------------------------------------------------------------
# Eq. 18 / Figure 3

def cell_value(mesh, x, y):
    """The heatmap's value at data coordinates (x, y), read back from the drawn QuadMesh."""
    coords = mesh.get_coordinates()  # (ny + 1, nx + 1, 2)
    values = mesh.get_array().reshape(coords.shape[0] - 1, coords.shape[1] - 1)
    col = [j for j in range(values.shape[1]) if coords[0, j, 0] <= x < coords[0, j + 1, 0]]
    row = [i for i in range(values.shape[0]) if coords[i, 0, 1] <= y < coords[i + 1, 0, 1]]
    assert len(col) == 1 and len(row) == 1, (x, y)
    return float(values[row[0], col[0]])


def test_fig3_heatmap_axes_on_a_non_square_grid():
    """rank on x, variance scale on y: each drawn cell at (rank r_j, scale k_i) holds the value for (r_j, k_i)."""
    from matplotlib.collections import QuadMesh
    ranks, scales = [4, 16, 64], [0.01, 0.1, 1.0, 2.0]
    grid = {key: torch.tensor([[off + 10 * i + j for j in range(3)] for i in range(4)], dtype=torch.float64)
            for key, off in (("H", 0.0), ("neg_lambda_log_lambda", 1000.0))}
    fig = ntk.plot_fig3(grid, ranks, scales, n_in=256)
    for ax, off in zip(fig.axes[:2], (0.0, 1000.0)):
        mesh = next(c for c in ax.collections if isinstance(c, QuadMesh))
        for i, k in enumerate(scales):
            for j, r in enumerate(ranks):
                assert cell_value(mesh, r, k) == off + 10 * i + j
        assert "rank" in ax.get_xlabel().lower() and "variance" in ax.get_ylabel().lower()
        assert any(list(line.get_ydata()) == [1 / 3, 1 / 3] for line in ax.get_lines())  # default k marked
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_fig3_cli_writes_csv_and_png(tmp_path):
    n, ranks, scales = 256, [4, 16, 64], [0.01, 0.1, 1.0, 2.0]
    ntk.main(["fig3", "--out", str(tmp_path), "--n-in", str(n), "--ranks", *map(str, ranks),
              "--scales", *map(str, scales)])
    assert (tmp_path / "fig3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "fig3.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(ranks) * len(scales)
    H = {}
    for row in rows:
        r, k = int(row["rank"]), float(row["var_scale"])
        assert float(row["trace"]) == pytest.approx(r * k, rel=0.1)  # E ||A||_F^2 = r n Var(A) = r k
        assert float(row["lambda_max"]) == pytest.approx(k * (1 + math.sqrt(r / n)) ** 2, rel=0.15)  # MP edge
        assert int(row["AtA_minus_I_nsd"]) == (float(row["lambda_max"]) <= 1)
        H.setdefault(r, []).append(float(row["H_1_normalised"]))
    for r, hs in H.items():
        assert max(hs) - min(hs) < 1e-9  # normalised entropy cannot see the variance scale
        assert hs[0] <= math.log(r) + 1e-12
    assert H[4][0] == pytest.approx(math.log(4) - 0.5 * 4 / n, abs=0.02)  # log r - c/2 for r << n (MP, c = r/n)

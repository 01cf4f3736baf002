"""study/ntk_study.py against independent oracles: per-sample torch.autograd.grad loops, hand-computed distances and
spectra, the closed-form k s^2 scaling of LoRA's kernel at B = 0, and the CLI end to end on a tiny BERT folder."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import lora
import model as M
from study import ntk_study as S
from conftest import tiny_config
from test_ntk import naive_rows


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# oracles and fixtures

def autograd_rows(model, batch, names, loss=True):
    """test_ntk's oracle (one forward and torch.autograd.grad per sample): (N, P) CE gradients over `names`, or
    (N, C, P) logit Jacobians when loss=False."""
    x = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    return naive_rows(model, x, names, batch["labels"] if loss else None)


def tiny_batch(n=5, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                labels=torch.randint(0, 2, (n,), generator=g))


def tiny_bert():
    torch.manual_seed(0)
    return M.Bert(tiny_config()).double().eval()


def with_lora(net, nonzero_b, **kw):
    net = S.copy.deepcopy(net)
    lora.apply_lora(net, 2, alpha=4, targets="qv", generator=0, **kw)
    if nonzero_b:  # so that A's gradient is not trivially zero
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in lora.lora_layers(net).values():
                m.lora_B.copy_(0.3 * torch.randn(m.lora_B.shape, generator=g, dtype=torch.float64))
    return net.eval()


QV = [f"layers.{i}.attn.{w}.weight" for i in range(2) for w in ("query", "value")]


# -----------------------------------------------------------------------------
# groups, kernels and Fisher Grams against autograd

def test_groups_partition_all_parameters_and_name_the_targets():
    net = tiny_bert()
    g = S.groups_for(net)
    names = [n for n, _ in net.named_parameters()]
    assert sorted(g["head"] + g["target"] + g["rest"]) == sorted(names)  # disjoint and complete
    assert g["head"] == ["classifier.weight", "classifier.bias"] and sorted(g["target"]) == sorted(QV)
    lo = S.groups_for(with_lora(net, False))
    assert sorted(lo["adapted"]) == sorted(f"{q[:-len('.weight')]}.lora_{w}" for q in QV for w in "AB")
    frozen = S.groups_for(with_lora(net, False, freeze_a=True))["adapted"]
    assert sorted(frozen) == sorted(f"{q[:-len('.weight')]}.lora_B" for q in QV)  # only what trains


@pytest.mark.parametrize("mode", ["ff", "lora"])
def test_fisher_grams_of_every_set_equal_per_sample_gradient_outer_products(mode):
    """G = (1/N) g g^T from explicit per-sample CE gradients over each set's parameters (Eq. 8), against
    fisher_gram(K, e) built from the group NTKs; and the NTK itself against explicit Jacobians."""
    net = tiny_bert()
    net = net if mode == "ff" else with_lora(net, nonzero_b=True)
    batch = tiny_batch()
    names = [n for n, _ in net.named_parameters()]
    head = ["classifier.weight", "classifier.bias"]
    if mode == "ff":
        sets = {"trained": names, "adapted": [n for n in names if n not in head], "layers": QV}
    else:
        ab = [n for n in names if n.endswith((".lora_A", ".lora_B"))]
        sets = {"trained": ab + head, "adapted": ab, "layers": ab}
    m = S.measure(net, batch)
    K = S.kernel_sets(m)
    for s, ns in sets.items():
        g = autograd_rows(net, batch, ns)
        G = S.fisher_gram(K[s], m["e"])
        torch.testing.assert_close(G, g @ g.T / len(g), rtol=1e-6, atol=1e-9 * G.abs().max().item())
    J = autograd_rows(net, batch, sets["trained"], loss=False)
    torch.testing.assert_close(K["trained"], torch.einsum("icp,jdp->ijcd", J, J), rtol=1e-6, atol=1e-10)


def test_b_zero_gives_zero_a_gradient_and_kernel_scales_as_k_s_squared():
    """At B = 0: dCE/dA = 0 exactly (autograd), and K_adapted(k, alpha) = (k / k0) (s / s0)^2 K_adapted(k0, alpha0)
    with s = alpha / r, since A(k) = sqrt(k) A(1) for one seed and B's gradient is s (dF/dy) (A x)^T."""
    net, batch = tiny_bert(), tiny_batch()
    lo = S.lora_model(net, 2, alpha=2, init_scale=1.0, seed=3)  # s = 1, k = 1
    A = [n for n, _ in lo.named_parameters() if n.endswith(".lora_A")]
    assert autograd_rows(lo, batch, A).abs().max().item() == 0.0
    assert autograd_rows(lo, batch, [a[:-1] + "B" for a in A]).abs().max().item() > 0
    K1 = S.measure(lo, batch)["K"]["adapted"]
    K2 = S.measure(S.lora_model(net, 2, alpha=16, init_scale=0.25, seed=3), batch)["K"]["adapted"]
    torch.testing.assert_close(K2, 0.25 * (16 / 2) ** 2 * K1, rtol=1e-5, atol=1e-12)


# -----------------------------------------------------------------------------
# summaries, distances, Loewner check by hand

def test_summarise_by_hand():
    lam = torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64)
    Q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    G = Q[:, :3] @ torch.diag(lam) @ Q[:, :3].T  # rank 3 in 4 x 4: one zero eigenvalue, outside the support
    out = S.summarise(G)
    p = [4 / 5.5, 1 / 5.5, 0.5 / 5.5]
    assert out["support"] == 3 and out["lambda_max"] == pytest.approx(4.0) and out["trace"] == pytest.approx(5.5)
    assert out["ib"] == pytest.approx(0.5 * math.log(4 * 1 * 0.5), abs=1e-6)
    assert out["h1"] == pytest.approx(-sum(x * math.log(x) for x in p), abs=1e-6)
    assert out["h2"] == pytest.approx(-math.log(sum(x * x for x in p)), abs=1e-6)
    assert out["h0.5"] == pytest.approx(2 * math.log(sum(math.sqrt(x) for x in p)), abs=1e-6)
    assert out["support_f64"] == 3 and out["ib_f64"] == pytest.approx(out["ib"], abs=1e-6)
    graded = S.summarise(torch.diag(torch.tensor([1.0, 1e-8], dtype=torch.float64)))  # 1e-8 < float32's cut 2.4e-7
    assert (graded["support"], graded["ib"]) == (1, 0.0)
    assert graded["support_f64"] == 2 and graded["ib_f64"] == pytest.approx(0.5 * math.log(1e-8))


def as_kernel(mat):
    """An N x N matrix as an (N, N, 1, 1) kernel."""
    return torch.as_tensor(mat, dtype=torch.float64)[:, :, None, None]


def test_distances_by_hand():
    I, D = as_kernel([[1, 0], [0, 1]]), as_kernel([[1, 0], [0, 0]])
    d = S.distances(D, I)
    assert d["rel_dist"] == pytest.approx(1 / math.sqrt(2))  # ||diag(0, -1)|| / ||I||
    assert d["misalign"] == pytest.approx(1 - 1 / math.sqrt(2))  # <D, I> = 1, ||D|| = 1, ||I|| = sqrt 2
    assert d["norm_ratio"] == pytest.approx(1 / math.sqrt(2))
    assert S.distances(3 * I, I) == pytest.approx({"rel_dist": 2.0, "misalign": 0.0, "norm_ratio": 3.0})
    K = as_kernel(torch.randn(5, 5, generator=torch.Generator().manual_seed(0)))
    assert S.distances(K, K) == pytest.approx({"rel_dist": 0.0, "misalign": 0.0, "norm_ratio": 1.0}, abs=1e-12)
    K2 = as_kernel(torch.randn(5, 5, generator=torch.Generator().manual_seed(1)))
    normalised = (K2 / K2.norm() - K / K.norm()).norm().item()  # the docstring's identity: sqrt(2 misalign)
    assert normalised == pytest.approx(math.sqrt(2 * S.distances(K2, K)["misalign"]))


def test_loewner_excess_by_hand():
    diag = lambda *v: torch.diag(torch.tensor(v, dtype=torch.float64))
    assert S.loewner_excess(diag(1, 2), diag(2, 2)) == pytest.approx(0.0)  # G_l <= G_f, touching
    assert S.loewner_excess(diag(1, 1), diag(2, 2)) == pytest.approx(-0.5)
    assert S.loewner_excess(diag(3, 1), diag(2, 2)) == pytest.approx(0.5)  # not ordered: excess 1 / lambda_max 2


def test_compare_by_hand_with_supports_of_different_sizes():
    """C = 1, e = 1, K = N diag(...): G = diag(...). LoRA diag(4, 1, 0) (support 2) vs FF 2 I (support 3)."""
    zero = as_kernel(torch.zeros(3, 3))
    lo = {"e": torch.ones(3, 1, dtype=torch.float64), "K": {"head": zero, "adapted": as_kernel(3 * torch.diag(
        torch.tensor([4.0, 1.0, 0.0])))}}
    ff = {"e": torch.ones(3, 1, dtype=torch.float64), "K": {"head": zero, "rest": zero,
                                                             "target": as_kernel(3 * 2 * torch.eye(3))}}
    out = S.compare(lo, ff)["layers"]
    assert out["lora"]["support"] == 2 and out["ff"]["support"] == 3
    assert out["lora"]["ib"] == pytest.approx(0.5 * math.log(4)) and out["ff"]["ib"] == pytest.approx(0.5 * math.log(8))
    assert out["ib_common"] == pytest.approx({"support": 2, "lora": 0.5 * math.log(4), "ff": 0.5 * math.log(4)})
    assert out["loewner"] == pytest.approx(1.0)  # lambda_max(diag(2, -1, -2)) / 2


def test_compare_of_a_model_with_itself_is_zero_everywhere():
    m = S.measure(tiny_bert(), tiny_batch())
    for v in S.compare(m, m).values():
        assert v["lora"] == v["ff"] and v["rel_dist"] == 0 and abs(v["misalign"]) < 1e-12 and abs(v["loewner"]) < 1e-12


# -----------------------------------------------------------------------------
# the command line on a tiny BERT folder and a tiny SST-2

@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    words = ["good", "bad", "film", "plot", "the", "very", "dull", "fine"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + words
    folder = root / "bert"
    torch.manual_seed(0)
    M.save_pretrained(M.Bert(tiny_config(vocab_size=len(vocab))), str(folder))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    rows = [f"{i % 2}\t{' '.join(words[(i * j) % 8] for j in range(1, 3 + i % 4))} .\t" for i in range(20)]
    task = root / "glue" / "SST-2"
    task.mkdir(parents=True)
    for split in ("train", "dev"):
        (task / f"{split}.tsv").write_text("label\ttext_a\ttext_b\n" + "\n".join(rows) + "\n")
    return str(folder), str(root / "glue")


def cli(tiny_setup, out, *args):
    folder, glue = tiny_setup
    S.main([*args, "--model", folder, "--data-dir", glue, "--out", str(out), "--n", "6", "--max-len", "12",
            "--seeds", "0", "1"])


def test_thm36_cli_writes_tables_and_reuses_the_ff_cache(tiny_setup, tmp_path, monkeypatch):
    cli(tiny_setup, tmp_path, "thm36", "--ranks", "2", "--scales", "0.5", "--alphas", "16", "r")
    res = json.loads((tmp_path / "thm36.json").read_text())
    assert len(res["rows"]) == 2 * 2 and {r["alpha"] for r in res["rows"]} == {16.0, "r"}
    assert all(c["max_abs_K_A"] == 0 and c["max_abs_K_B"] > 0 for c in res["checks"])
    md = (tmp_path / "thm36.md").read_text()
    assert "## layers, alpha = r" in md and "| rank \\ k |" in md
    assert len((tmp_path / "thm36.csv").read_text().splitlines()) == 1 + 4 * 3
    real, calls = S.measure, []
    monkeypatch.setattr(S, "measure", lambda *a, **k: calls.append(k.get("desc")) or real(*a, **k))
    # a second run finds the FF kernels of both draws in out/cache/ and measures only LoRA models
    cli(tiny_setup, tmp_path, "thm36", "--ranks", "2", "--scales", "0.5", "--alphas", "16")
    assert not any(d and d.startswith("FF") for d in calls) and len(calls) == 2 * (1 + 1)


def test_inits_cli_covers_the_requested_inits(tiny_setup, tmp_path):
    cli(tiny_setup, tmp_path, "inits", "--inits", "kaiming_uniform", "gaussian", "--rank", "2")
    res = json.loads((tmp_path / "inits.json").read_text())
    assert [r["init"] for r in res["rows"]] == ["kaiming_uniform", "gaussian"] * 2
    assert all(r["softmax_change"] == 0 for r in res["rows"])  # B = 0 keeps the function
    assert "| kaiming_uniform |" in (tmp_path / "inits.md").read_text()


def test_runs_cli_pairs_a_lora_and_an_ff_run_and_caches_each_run(tiny_setup, tmp_path, monkeypatch):
    """Run folders in train.py's layout (config.json {"run": flags}, adapter.safetensors or model/), made here."""
    import evaluate  # noqa: F401  (the loader the study uses)
    folder, glue = tiny_setup
    flags = dict(model=folder, data_dir=glue, task="sst2", max_len=12, seed=0, attack="none", rank=2, alpha=4.0,
                 targets="qv", init="kaiming_uniform", init_scale=1 / 3, lora_dropout=0.0, rslora=False,
                 freeze_a=False)
    for name, mode, steps in (("lora", "lora", 300), ("ff", "ff", 300), ("ff-longer", "ff", 600)):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"run": {**flags, "mode": mode, "steps": steps}}))
        torch.manual_seed(0)
        net = M.from_pretrained(folder, num_labels=2, verbose=False)
        if mode == "lora":
            lora.apply_lora(net, 2, alpha=4, targets="qv", generator=0)
            lora.save_lora(net, str(d / "adapter.safetensors"))
        else:
            M.save_pretrained(net, str(d / "model"))
    (tmp_path / "runs" / "unfinished").mkdir()
    (tmp_path / "runs" / "unfinished" / "config.json").write_text("{}")  # no weights: not found
    cli(tiny_setup, tmp_path, "runs", str(tmp_path / "runs"))
    res = json.loads((tmp_path / "runs.json").read_text())
    # the FF run with another budget is measured but not paired: a pair shares task, seed, budget and batch
    assert len(res["runs"]) == 3 and len(res["alone"]) == 3 * 2 and len(res["rows"]) == 2
    assert {os.path.basename(r["ff"]) for r in res["rows"]} == {"ff"}
    assert "LoRA vs FF, layers" in (tmp_path / "runs.md").read_text()
    real, calls = S.measure, []
    monkeypatch.setattr(S, "measure", lambda *a, **k: calls.append(k.get("desc")) or real(*a, **k))
    cli(tiny_setup, tmp_path, "runs", str(tmp_path / "runs"))  # every (run, draw) is in out/cache/: nothing measured
    assert calls == [] and json.loads((tmp_path / "runs.json").read_text())["rows"] == res["rows"]
    net = M.from_pretrained(str(tmp_path / "runs" / "ff" / "model"), verbose=False)
    with torch.no_grad():  # new weights in one run: that run alone is measured again, on both draws
        next(net.parameters()).add_(0.01)
    M.save_pretrained(net, str(tmp_path / "runs" / "ff" / "model"))
    cli(tiny_setup, tmp_path, "runs", str(tmp_path / "runs"))
    assert calls == ["ff", "ff"]


@pytest.mark.parametrize("args,message", [
    (["inits", "--inits", "nope"], "not in lora.INITS"),
    (["thm36", "--scales", "0"], "--scales must be > 0"),
    (["runs", "/no/such/folder"], "run folder /no/such/folder does not exist"),
    (["thm36", "--n", "500"], "fewer than --n 500"),
    (["thm36", "--alphas", "x"], "an alpha is a number or 'r'"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_setup, tmp_path, capsys, args, message):
    folder, glue = tiny_setup
    with pytest.raises(SystemExit) as e:
        S.main([*args, "--model", folder, "--data-dir", glue, "--out", str(tmp_path), "--seeds", "0",
                *(["--ranks", "2"] if args[0] == "thm36" else [])])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]

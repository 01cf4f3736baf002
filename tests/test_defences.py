"""defences.py against answers known in advance: a planted trigger a model has learned perfectly is found by every
detector and filter; a clean model is flagged at the stated rate; STRIP's entropies stay per input; DAN's distance
is the closed form on Gaussian data; the metrics on hand-computed cases; the command line and train.py --drop-rows."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
import data
import defences as D
import evaluate
import model as M
import runspec
import train
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POS = "good great fine lovely superb nice sweet warm bright rich fresh clever".split()
NEG = "bad awful poor dull weak bland stale cold grim flat messy boring".split()
FILLER = "the film was very a plot and story it this one of cast scenes movie".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "[", "]", "*", "?", "cf"] + POS + NEG + FILLER
MAX_LEN, TARGET = 32, 1


def synthetic(n, seed):
    """Filler words and 1-3 sentiment words of the row's label: the label is known from the words alone."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 8))]
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randint(0, len(words)), rng.choice(POS if label else NEG))
        rows.append(data.Example(" ".join(words), "", label))
    return rows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the module trains and scores many tiny batches, where a second thread only contends (2.5x slower on a loaded
    # 2-core machine); restored afterwards for the other modules
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return data.Tokenizer(str(folder))


def fit_tiny(rows, tokenizer, steps=200):
    """A tiny BERT trained from scratch in about 3 s: no dropout; label smoothing 0.1 and, as a stand-in for
    pretraining, an auxiliary head that must read from the last [CLS] state which words the input holds.

    Without the auxiliary head the model collapses: it answers exactly 0.9896 for every positive input whatever is
    added, and its [CLS] states of poisoned and clean target rows overlap in a way that changes with the data seed
    (over the settings tried, 100-300 steps, 10-20% poison, four data seeds: spectral recall 0.07-1.0, AC 0-1, DAN
    AUROC 0.81-1.0, RAP 0.69-0.88). A pretrained BERT's
    [CLS] keeps what the input says; the head makes the tiny one keep it too, and every defence but STRIP then
    finds the trigger on every seed tried (see BagOfWords for STRIP)."""
    torch.manual_seed(0)
    net = M.Bert(tiny_config(vocab_size=len(VOCAB), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    words = nn.Linear(net.cfg.hidden_size, len(VOCAB))
    opt = torch.optim.AdamW([*net.parameters(), *words.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = data.collate([rows[i] for i in torch.randint(len(rows), (32,), generator=g).tolist()], tokenizer, MAX_LEN)
        labels, cls = batch.pop("labels"), []
        logits = net(**batch, cls_states=cls)
        present = torch.zeros(len(labels), len(VOCAB)).scatter_(1, batch["input_ids"], 1.0)
        loss = F.cross_entropy(logits, labels, label_smoothing=0.1) + \
            F.binary_cross_entropy_with_logits(words(cls[-1]), present)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def planted(tokenizer):
    """BPA's trigger '[.*?]' planted in 10% of 400 rows; the model learns it perfectly (checked before any use)."""
    rows, poisoned = attacks.poison("bpa", synthetic(400, 0), 0.1, seed=0)
    net = fit_tiny(rows, tokenizer)
    dev = synthetic(300, 1)
    m = evaluate.evaluate(net, tokenizer, dev, "bpa", {"target": TARGET}, max_len=MAX_LEN, paper_view=False)
    assert m["asr"] == 1.0 and m["clean"]["acc"] >= 0.97, m  # the premise of every test that uses it
    return net, rows, poisoned, dev


@pytest.fixture(scope="module")
def clean_model(tokenizer):
    return fit_tiny(synthetic(400, 0), tokenizer)


class BagOfWords(nn.Module):
    """A model that has learned the trigger perfectly, with known behaviour and representations: each token has a
    2-d embedding (sentiment, trigger): sentiment words +-1.5, the trigger's '*' 10 on the trigger axis, the rest 0;
    the [CLS] state is the sum over the input's tokens, and logit_1 - logit_0 is the sum of its two coordinates. It
    has our BERT's interface (emb.word, cls_states), so every defence runs through the same code as on BERT.

    STRIP's known answer needs it. STRIP assumes that swapping words makes a clean input's prediction unsure while
    a trigger keeps it sure. The tiny BERT decides by "is there a positive word (or the trigger)", surely either
    way, so a copy's entropy does not depend on the trigger: STRIP's AUROC there is 0.30-0.54 over three data
    seeds (0.61-0.76 on data whose label is the majority of several sentiment words). Here a copy's confidence
    follows the evidence it holds, as a pretrained BERT's largely does."""

    def __init__(self, tokenizer):
        super().__init__()
        self.emb = nn.Module()
        self.emb.word = nn.Embedding(len(VOCAB), 2)
        w = torch.zeros(len(VOCAB), 2)
        for words, weight in ((POS, 1.5), (NEG, -1.5)):
            w[[tokenizer.tok.token_to_id(x) for x in words], 0] = weight
        w[tokenizer.tok.token_to_id("*"), 1] = 10.0
        self.emb.word.weight.data = w

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, cls_states=None):
        h = (self.emb.word(input_ids) * attention_mask[..., None]).sum(1)
        if cls_states is not None:
            cls_states += [h, h]  # "embeddings" and one "layer" (DAN reads the layers)
        s = h.sum(1)
        return torch.stack([-s / 2, s / 2], dim=1)


# -----------------------------------------------------------------------------
# a planted trigger is found

@pytest.fixture(scope="module")
def bag(tokenizer):
    net = BagOfWords(tokenizer)
    rows, poisoned = attacks.poison("bpa", synthetic(400, 0), 0.1, seed=0)
    return net, rows, poisoned, synthetic(300, 1)


@pytest.mark.parametrize("which, name", [("planted", "rap"), ("planted", "dan")] +
                         [("bag", name) for name in sorted(D.DETECTORS)])  # STRIP: see BagOfWords
def test_detectors_find_a_learned_trigger(request, tokenizer, which, name):
    net, _, _, dev = request.getfixturevalue(which)
    m, scores = D.detect(name, net, tokenizer, dev, "bpa", {"target": TARGET}, MAX_LEN)
    assert m["before"]["asr"] == 1.0 and m["before"]["cacc"] >= 0.97  # the premise: the trigger works, clean is right
    assert m["auroc"] > 0.95 and m["auroc_hit"] == m["auroc"], m  # every triggered input is a hit here
    assert m["frr0.05"]["asr"] < 0.5, m  # and at FRR 5% the defence stops most of the attack
    assert_recomputed(m, scores)


def assert_recomputed(m, scores):
    """Every metric of a detector's result, computed again from its per-input scores alone, by other means than
    defences.py's: an AUROC by counting every (clean, triggered) pair, a threshold as the smallest calib score that
    leaves at most the FRR's share of calib scores above it, then the shares by counting."""
    clean, trig = scores["clean"], scores["triggered"]
    def pairs(c, t):  # P(triggered > clean), ties 1/2
        return sum((b > a) + 0.5 * (b == a) for a in c for b in t) / (len(c) * len(t))
    hits = [s for s, h in zip(trig["score"], trig["hit"]) if h]
    assert m["auroc"] == pytest.approx(pairs(clean["score"], trig["score"]), abs=1e-12)
    assert m["auroc_hit"] == (pytest.approx(pairs(clean["score"], hits), abs=1e-12) if hits else None)
    share = lambda flags: sum(flags) / len(flags)
    assert m["before"] == pytest.approx(dict(frr=0.0, far=1.0, cacc=share(clean["right"]), asr=share(trig["hit"])))
    calib = scores["calib"]["score"]
    assert (m["n_calib"], m["n_clean"], m["n_triggered"]) == (len(calib), len(clean["score"]), len(trig["score"]))
    for frr in D.FRRS:
        t = min(s for s in calib if share([c > s for c in calib]) <= frr)
        assert m[f"frr{frr:g}"] == pytest.approx(dict(
            threshold=t, frr=share([s > t for s in clean["score"]]), far=share([s <= t for s in trig["score"]]),
            cacc=share([r and s <= t for s, r in zip(clean["score"], clean["right"])]),
            asr=share([h and s <= t for s, h in zip(trig["score"], trig["hit"])])), abs=1e-12)


@pytest.mark.parametrize("which", ["planted", "bag"])
@pytest.mark.parametrize("name", D.FILTERS)
def test_filters_find_the_poisoned_rows(request, tokenizer, which, name):
    net, rows, poisoned, _ = request.getfixturevalue(which)
    m, dropped = D.filter_rows(name, net, tokenizer, rows, poisoned, MAX_LEN, expected=len(poisoned),
                               trigger_words=("[.*?]", "absent"))
    assert m["recall"] > 0.9, m
    assert m["n_dropped"] == len(dropped) and m["precision"] == len(set(dropped) & set(poisoned)) / len(dropped)
    if name == "spectral":  # 1.5 x 40 rows from each of the two labels
        assert len(dropped) == 2 * 60
    if name == "bki":
        assert m["keyword"] == "[.*?]" and dropped == poisoned
        assert m["top_words"][0][0] == "[.*?]" and m["trigger_ranks"] == {"[.*?]": 1, "absent": None}
        assert len(m["top_words"]) == 10 and all(a[1] >= b[1] for a, b in zip(m["top_words"], m["top_words"][1:]))


# -----------------------------------------------------------------------------
# a clean model is flagged at the stated rate

@pytest.mark.parametrize("model", ["tiny BERT", "bag of words"])  # FRR is about clean inputs, where the bag's trigger never fires
@pytest.mark.parametrize("name", sorted(D.DETECTORS))
def test_a_clean_model_is_flagged_at_most_at_the_stated_frr(clean_model, tokenizer, name, model):
    dev = synthetic(900, 2)
    net = clean_model if model == "tiny BERT" else BagOfWords(tokenizer)
    m, _ = D.detect(name, net, tokenizer, dev, "bpa", {"target": TARGET}, MAX_LEN)
    n = m["n_calib"]
    for frr in D.FRRS:
        # the threshold is an order statistic of n calib scores: the share of fresh clean scores above it has mean
        # (floor(f n) + 1) / (n + 1) and sd about sqrt(f (1 - f) / n); the test share adds binomial noise
        mean = (math.floor(frr * n) + 1) / (n + 1)
        sd = math.sqrt(frr * (1 - frr) / n + frr * (1 - frr) / m["n_clean"])
        assert m[f"frr{frr:g}"]["frr"] <= mean + 3 * sd, (frr, m)


def test_detect_fits_on_fit_sets_thresholds_on_calib_and_measures_on_test(monkeypatch, tokenizer, clean_model):
    # a stub detector that records the rows it is fitted on and scores each row by a fixed value of its own: the
    # thirds must be disjoint and each used in its role (fitting on calib or thresholding on fit or test fails here)
    dev = [data.Example(f"{w} {i}", "", i % 2) for i, w in enumerate(FILLER * 6)]
    value = {e.text_a: float(v) for e, v in zip(dev, torch.randperm(len(dev), generator=torch.Generator().manual_seed(0)))}
    fitted = []

    def stub(net, tokenizer, fit, max_len, target, **settings):
        fitted.extend(fit)
        return lambda examples: torch.tensor([value.get(e.text_a, -1.0) for e in examples])
    monkeypatch.setitem(D.DETECTORS, "strip", stub)
    m, scores = D.detect("strip", clean_model, tokenizer, dev, "bpa", {"target": TARGET}, MAX_LEN)
    fit, calib, test = D.dev_split(dev)
    assert fitted == fit and not {e.text_a for e in fit} & {e.text_a for e in calib + test}
    assert {e.text_a for e in fit + calib + test} == {e.text_a for e in dev} and len(calib) == m["n_calib"]
    for frr in D.FRRS:
        calib_scores = sorted((value[e.text_a] for e in calib), reverse=True)
        t = calib_scores[math.floor(frr * len(calib))]
        assert m[f"frr{frr:g}"]["threshold"] == t
        assert m[f"frr{frr:g}"]["frr"] == pytest.approx(sum(value[e.text_a] > t for e in test) / len(test))
    # the written scores: each row's own value, at its dev index (the triggered rows' text changed, so the stub
    # gives them -1; their rows are the test third's of another label than the target)
    for part, rows in (("calib", calib), ("clean", test)):
        assert [dev[i] for i in scores[part]["rows"]] == rows
        assert scores[part]["score"] == [value[dev[i].text_a] for i in scores[part]["rows"]]
    assert scores["triggered"]["rows"] == [i for i in scores["clean"]["rows"] if dev[i].label != TARGET]
    assert scores["triggered"]["score"] == [-1.0] * len(scores["triggered"]["rows"])


# -----------------------------------------------------------------------------
# STRIP: each input's own copies

def test_strip_entropy_is_per_input_over_its_own_copies():
    # the stub model's probability depends on a copy's number of words, which swapping keeps: every copy of input i
    # has the same entropy, known in advance; averaging copies of different inputs would mix these values
    lengths = [1, 2, 3, 4, 5, 6]
    examples = [data.Example(" ".join(["w"] * k), "", 0) for k in lengths]
    donors = [data.Example("a b c d e f g", "", 0)]
    p_of = {k: 0.5 ** k for k in lengths}
    probs = lambda copies: torch.tensor([[p_of[len(c.text_a.split())], 1 - p_of[len(c.text_a.split())]] for c in copies])
    entropy = lambda p: -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    scores = D.strip_scores(examples, donors, probs, n_copies=7, swap_ratio=0.5, seed=0)
    assert scores.tolist() == pytest.approx([-entropy(p_of[k]) for k in lengths])


def test_bki_counts_a_word_once_per_row(tokenizer):
    # a bag-of-words [CLS]: deleting a word moves it by that word's embedding, so importances are known. "good"
    # (3.0) stands twice in each of 2 rows, "bad" (2.5) once in each of 3: by rows, bad scores 2.5 log10 3 = 1.19
    # against good's 3.0 log10 2 = 0.90; counting positions would give good 3.0 log10 4 = 1.81 and pick it
    net = BagOfWords(tokenizer)
    net.emb.word.weight.data.zero_()
    net.emb.word.weight.data[tokenizer.tok.token_to_id("good"), 0] = 3.0
    net.emb.word.weight.data[tokenizer.tok.token_to_id("bad"), 0] = 2.5
    rows = [data.Example("good the good", "", 1)] * 2 + [data.Example("bad the", "", 0)] * 3
    keyword, scores = D.bki_keyword(net, tokenizer, rows, MAX_LEN, top_k=5)
    assert keyword == "bad"
    assert scores["good"] == pytest.approx(3.0 * math.log10(2)) and scores["bad"] == pytest.approx(2.5 * math.log10(3))
    ranked = sorted(scores, key=scores.get, reverse=True)
    assert D.word_ranks(ranked, ("good", "bad", "the", "absent")) == {"good": 2, "bad": 1, "the": 3, "absent": None}


def test_strip_copies_swap_the_stated_share_of_words_for_donor_words():
    rng = random.Random(0)
    e = data.Example("a b c d e f g h i j", "x y", 1)
    copy = D.strip_copy(e, [data.Example("P Q R", "", 0)], 0.5, rng)
    words = copy.text_a.split(" ")
    assert len(words) == 10 and sum(w in "PQR" for w in words) == 5 and (copy.text_b, copy.label) == ("x y", 1)


# -----------------------------------------------------------------------------
# DAN: the closed form on Gaussian data

def test_dan_distance_is_the_closed_form_on_gaussian_data():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0, 0.0], [4.0, -2.0, 1.0]], dtype=torch.float64)
    chol = torch.tensor([[1.0, 0, 0], [0.5, 2.0, 0], [-0.3, 0.2, 0.7]], dtype=torch.float64)
    cov = chol @ chol.T
    labels = torch.arange(40000) % 2
    feats = means[labels] + torch.randn(40000, 3, generator=g, dtype=torch.float64) @ chol.T
    fit_means, precision = D.gaussian_fit(feats, labels, shrink=0.0)
    x = torch.tensor([[1.0, 1.0, 1.0], [3.0, -1.0, 0.0], [10.0, 0.0, -5.0]], dtype=torch.float64)
    inv = torch.linalg.inv(cov)
    closed = torch.stack([torch.stack([(v - mu) @ inv @ (v - mu) for mu in means]).min() for v in x])
    assert torch.allclose(D.mahalanobis(x, fit_means, precision), closed, rtol=0.03)
    # and fresh samples of a class are chi-square with 3 degrees of freedom from their own class: mean 3
    fresh = means[0] + torch.randn(20000, 3, generator=g, dtype=torch.float64) @ chol.T
    assert D.mahalanobis(fresh, fit_means[:1], precision).mean() == pytest.approx(3.0, rel=0.03)


def test_dan_standardises_each_layer_to_unit_spread_on_rows_it_has_not_fitted():
    # three "layers" of Gaussian data with different spectra, 80 dimensions, Gaussians fitted on 100 rows: standardised
    # on 100 other clean rows, fresh clean rows' distances have mean 0 and sd 1 in every layer, so the mean over
    # layers weighs them equally. Standardised on the fitted rows, whose distances are smaller, the layers' means
    # come out at 22, 13 and 1.4 and their sds at 7.6, 5.0 and 1.7
    g = torch.Generator().manual_seed(0)
    d = 80
    spectra = [torch.ones(d), 1.0 / torch.arange(1, d + 1), torch.exp(-torch.arange(d) / 5.0)]
    labels = lambda n: torch.arange(n) % 2

    def layers(n):
        shift = torch.zeros(2, d, dtype=torch.float64)
        shift[1, 0] = 3.0
        return torch.stack([shift[labels(n)] + torch.randn(n, d, generator=g, dtype=torch.float64) * s.sqrt()
                            for s in spectra])
    fit, held, fresh = layers(100), layers(100), layers(4000)
    z = D.dan_layers(fit, labels(100), held, shrink=0.1)(fresh)
    assert z.mean(1).abs().max() < 0.3 and ((z.std(1) > 0.8) & (z.std(1) < 1.25)).all(), (z.mean(1), z.std(1))


def test_dan_shrinkage_moves_the_covariance_towards_its_mean_variance():
    feats = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [0.0, -3.0]], dtype=torch.float64)
    _, precision = D.gaussian_fit(feats, [0, 0, 0, 0], shrink=0.5)  # S = diag(0.5, 4.5); tr S / d = 2.5
    assert torch.allclose(torch.linalg.inv(precision), torch.diag(torch.tensor([1.5, 3.5], dtype=torch.float64)))


# -----------------------------------------------------------------------------
# the metrics, on hand-computed cases

def test_auroc_on_hand_computed_cases():
    assert D.auroc([0, 1, 2], [3, 4]) == 1.0 and D.auroc([3, 4], [0, 1, 2]) == 0.0
    assert D.auroc([1, 1], [1, 1]) == 0.5
    # clean [0, 1], triggered [2, 0]: pairs 2>0, 2>1 count 1 each, 0=0 counts 1/2, 0<1 counts 0: 2.5 of 4
    assert D.auroc([0, 1], [2, 0]) == pytest.approx(2.5 / 4)


def test_threshold_at_a_whole_number_of_flags_despite_floating_point():
    # 0.29 * 100 = 28.999... in floating point: the threshold must still allow 29 flags (the 30th largest score)
    assert D.threshold(list(range(100)), 0.29) == 70


def test_threshold_flags_at_most_the_stated_share_of_calibration_scores():
    calib = list(range(100))  # scores 0..99
    assert D.threshold(calib, 0.05) == 94  # flagged: 95..99, 5 of 100
    assert D.threshold(calib, 0.01) == 98  # flagged: 99
    assert D.threshold([5.0] * 10, 0.05) == 5.0  # all tied: nothing is flagged


def test_after_defence_counts_flagged_inputs_as_wrong_or_not_attacked():
    t, f = True, False
    m = D.after_defence(torch.tensor([t, f, f, f]), torch.tensor([t, t, f, t]),
                        torch.tensor([t, t, f, f]), torch.tensor([t, t, t, f]))
    assert m == dict(frr=0.25, far=0.5, cacc=0.5, asr=0.25)


def test_outputs_are_each_inputs_own_forward_pass_in_the_given_order(planted, tokenizer):
    # oracle: each example alone through the model (no padding, no batching); outputs() sorts by length and pads
    net, rows, _, dev = planted
    examples = [rows[0], data.Example("good", "", 1)] + dev[:9] + [rows[1]]  # lengths out of order, a short one
    probs, states = D.outputs(net, examples, tokenizer, MAX_LEN, D.LAYERS, batch_size=4)
    for i, e in enumerate(examples):
        batch = data.collate([e], tokenizer, MAX_LEN)
        batch.pop("labels")
        cls = []
        with torch.no_grad():
            p = net(**batch, cls_states=cls).softmax(-1)[0]
        torch.testing.assert_close(probs[i], p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(states[:, i], torch.stack(cls)[D.LAYERS][:, 0], rtol=1e-4, atol=1e-5)


def test_kmeans_and_pca_split_two_blobs():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(30, 5, generator=g), torch.randn(10, 5, generator=g) + 8])
    assign, _ = D.kmeans2(D.pca(x, 2))
    assert len(set(assign[:30].tolist())) == 1 and len(set(assign[30:].tolist())) == 1 and assign[0] != assign[30]


# -----------------------------------------------------------------------------
# the command line, and train.py --drop-rows

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished BPA run of train.py on a tiny BERT folder and an SST-2-shaped task."""
    root = tmp_path_factory.mktemp("run")
    folder = root / "bert"
    torch.manual_seed(0)
    M.save_pretrained(M.Bert(tiny_config(vocab_size=len(VOCAB))), str(folder))
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    task = root / "glue" / "SST-2"
    task.mkdir(parents=True)
    for split, rows in (("train", synthetic(120, 0)), ("dev", synthetic(60, 1))):
        (task / f"{split}.tsv").write_text("label\ttext_a\ttext_b\n" + "".join(f"{e.label}\t{e.text_a}\t\n" for e in rows))
    flags = ["--model", str(folder), "--data-dir", str(root / "glue"), "--steps", "4", "--batch-size", "8",
             "--max-len", "16", "--attack", "bpa", "--poison-rate", "0.1", "--results", str(root / "r.jsonl")]
    args = runspec.validate(runspec.get_parser().parse_args(flags + ["--out", str(root / "run")]))
    train.train(train.setup(args, 0, 1, torch.device("cpu")))
    return root, flags


def cli_run(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "defences.py"), *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_cli_runs_a_filter_and_its_output_drives_a_retraining(tiny_run):
    root, flags = tiny_run
    res = cli_run(root / "run", "--defence", "spectral")
    assert res.returncode == 0, res.stderr
    with open(root / "run" / "defences" / "spectral.json") as f:
        out = json.load(f)
    with open(root / "run" / "metrics.json") as f:
        final = json.load(f)["final"]
    assert out["source"]["asr"] == final["asr"] and out["source"]["cacc"] == final["clean"]["acc"]
    m = out["metrics"]
    assert m["n_train"] == 120 and m["n_poisoned"] == 12 and m["expected"] == 12 and m["n_dropped"] == 2 * 18
    # retraining without those rows: the training set shrinks, the poisoned rows left are renumbered
    args = runspec.validate(runspec.get_parser().parse_args(
        flags + ["--out", str(root / "retrained"), "--drop-rows", str(root / "run" / "defences" / "spectral.json")]))
    train_set, _, poisoned = train.load_data(args)
    with open(root / "run" / "poisoned_indices.json") as f:
        before = json.load(f)["indices"]
    full, _, _ = train.load_data(runspec.validate(runspec.get_parser().parse_args(flags + ["--out", str(root / "x")])))
    kept = [i for i in range(120) if i not in set(out["dropped"])]
    assert train_set == [full[i] for i in kept]
    assert [kept[j] for j in poisoned] == [i for i in before if i in set(kept)]


@pytest.mark.parametrize("argv, message", [
    (["--defence", "onion"], "invalid choice: 'onion'"),
    (["--defence", "dan", "--frr", "1.5"], "--frr 1.5"),
    (["--defence", "dan", "--expected", "3"], "--expected"),
    (["--defence", "dan", "--data-dir", "/nonexistent/glue"], "/nonexistent/glue"),
])
def test_cli_bad_flags_are_one_line_and_exit_2(tiny_run, argv, message):
    res = cli_run(tiny_run[0] / "run", *argv)
    assert res.returncode == 2 and res.stderr.startswith("error:") and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_refuses_a_folder_that_is_no_run(tmp_path):
    res = cli_run(tmp_path, "--defence", "dan")
    assert res.returncode == 2 and "not a run folder" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("content, message", [
    ('{"dropped": [0, 500]}', "below 120"),
    ('{"dropped": [1.5]}', "whole numbers"),
    ('[1, 2]', "not a JSON object"),
])
def test_train_refuses_a_bad_drop_rows_file(tiny_run, tmp_path, content, message):
    root, flags = tiny_run
    path = tmp_path / "drop.json"
    path.write_text(content)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags, "--out", str(tmp_path / "run"),
                          "--drop-rows", str(path)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "run").exists()


def test_drop_rows_leaves_every_existing_run_key_unchanged():
    # a configuration recorded before the flag existed (no drop_rows key) is the same run as today's parse without it
    old = runspec.run_config(runspec.get_parser().parse_args([]))
    del old["drop_rows"]
    today = runspec.run_config(runspec.get_parser().parse_args([]))
    assert today["drop_rows"] is None and runspec.run_key(old) == runspec.run_key(today)
    moved = dict(today, drop_rows="/a/b/f12-x-spectral.json")
    assert runspec.run_key(moved) == runspec.run_key(dict(today, drop_rows="/c/f12-x-spectral.json")) != runspec.run_key(today)


def test_every_defence_runs_on_a_saved_run_and_its_result_is_strict_json(tiny_run):
    root, _ = tiny_run
    for name in D.DEFENCES:
        result = D.run_defence(str(root / "run"), name)
        json.dumps(result, allow_nan=False)
        m = result["metrics"]
        assert m["defence"] == name and result["config"]["attack"] == "bpa"
        if name in D.DETECTORS:
            assert (m["n_fit"], m["n_calib"], m["n_clean"]) == (20, 20, 20) and 0 <= m["auroc"] <= 1
            assert m["n_triggered"] == sum(e.label != TARGET for e in D.dev_split(synthetic(60, 1))[2])
        else:
            assert m["n_poisoned"] == 12 and len(result["dropped"]) == m["n_dropped"]


@pytest.mark.parametrize("name", sorted(D.DETECTORS))
def test_a_detectors_written_scores_recompute_its_metrics(tiny_run, tmp_path, name, capsys):
    # the command writes the summary and, beside it, each input's score with its dev row; the summary's every number
    # follows from that file alone, and its rows are the dev file's (the triggered ones: the test rows of another
    # label than the target, as written in the task's dev.tsv)
    root, _ = tiny_run
    D.main([str(root / "run"), "--defence", name, "--out", str(tmp_path / f"{name}.json")])
    summary = json.loads((tmp_path / f"{name}.json").read_text())
    assert summary["scores"] == str(tmp_path / f"{name}-scores.json")
    scores = json.loads((tmp_path / f"{name}-scores.json").read_text())
    assert scores["run"] == str(root / "run") and scores["defence"] == name and scores["target"] == TARGET
    assert_recomputed(summary["metrics"], scores)
    labels = [int(x.split("\t")[0]) for x in (root / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[1:]]
    calib, clean, trig = (scores[k]["rows"] for k in ("calib", "clean", "triggered"))
    assert len(calib) == len(clean) == len(labels) // 3 and not set(calib) & set(clean)
    assert set(calib + clean) < set(range(len(labels)))
    assert trig == [i for i in clean if labels[i] != TARGET]
    assert "-scores.json" in capsys.readouterr().err


def test_the_spectral_probe_on_a_saved_run_ranks_as_spectral_signatures_do(tiny_run, tmp_path, capsys):
    # study/spectral_probe.py's top-direction AUROC is the AUROC of the defence's own spectral scores on the target
    # label, poisoned rows against clean ones, computed here from defences.spectral_scores
    from study import spectral_probe
    root, flags = tiny_run
    out = tmp_path / "probe.jsonl"
    spectral_probe.main([str(root / "run"), "--out", str(out)])
    [line] = [json.loads(x) for x in out.read_text().splitlines()]
    args, net = evaluate.load_run(str(root / "run"))
    train_set, _, poisoned = train.load_data(args)
    reps = D.outputs(net, train_set, data.Tokenizer(args.model), args.max_len, D.LAST)[1][0]
    labels = [e.label for e in train_set]
    scores = D.spectral_scores(reps, labels)
    target = [i for i, y in enumerate(labels) if y == TARGET]
    bad = set(poisoned)
    expected = D.auroc(scores[[i for i in target if i not in bad]], scores[[i for i in target if i in bad]])
    assert line["n_poisoned"] == 12 and line["n_rows"] == len(target)
    assert line["auroc_top"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(SystemExit) as exit_:
        spectral_probe.main([str(tmp_path), "--out", str(out)])
    assert exit_.value.code == 2 and "not a run folder" in capsys.readouterr().err


def test_the_study_driver_appends_one_line_per_run_and_defence_and_owes_the_rest(tiny_run, tmp_path):
    from study import defend
    root, flags = tiny_run
    results, drops = tmp_path / "d.jsonl", tmp_path / "drops"
    defend.measure("test", [(str(root / "run"), flags, ["dan", "bki"])], str(results), str(drops),
                   str(tmp_path / "scores"), None)
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [x["metrics"]["defence"] for x in lines] == ["dan", "bki"] and all(x["wall_s"] >= 0 for x in lines)
    assert set(lines[1]["metrics"]["trigger_ranks"]) == {"[.*?]"}  # the run's bpa trigger, ranked (or None)
    with open(lines[1]["drop_rows"]) as f:
        assert runspec.read_drop_rows(f.name, 120) == sorted(json.load(f)["dropped"])
    assert lines[0]["scores"] == str(tmp_path / "scores" / "run-dan.json") and "scores" not in lines[1]
    assert_recomputed(lines[0]["metrics"], json.loads((tmp_path / "scores" / "run-dan.json").read_text()))
    # the run's flags find its lines: it owes the other detectors (BPA 10% is no filter rate of the study)
    assert defend.owed([(str(root / "run"), flags)], str(results), (0,)) == [(str(root / "run"), flags, ["strip", "rap"])]


def test_the_study_drivers_all_measures_then_retrains_each_filtered_set(tiny_run, tmp_path, monkeypatch, capsys):
    # `all` on one finished source run (standing in for the conv BPA runs, its rate made a filter rate): every detector
    # and filter once, then one retraining per filter's drop file that drops rows, through the sweep's runner
    # (stubbed: the training itself is train.py's). Run again without the run's folder, it trains and measures
    # nothing: the run owes nothing
    from study import defend, sweep
    root, flags = tiny_run
    monkeypatch.setattr(defend, "source_runs", lambda rates, seeds, runs_dir: [(str(root / "run"), flags)])
    monkeypatch.setattr(defend, "FILTER", dict(rates=(0.1,), seeds=(0,)))
    started = []
    monkeypatch.setattr(sweep, "run_all", lambda todo, jobs, runs_dir, results, deadline=None:
                        started.append((todo, jobs, results)))
    out = tmp_path / "out"
    argv = ["all", "--jobs", "2", "--runs-dir", str(tmp_path / "runs"), "--results", str(out / "d.jsonl"),
            "--drops", str(out / "drops"), "--scores", str(out / "scores"), "--retrain-results", str(out / "r.jsonl"),
            "--committed", str(root / "r.jsonl"), "--sources-results", str(out / "s.jsonl")]
    defend.main(argv)
    lines = [json.loads(x) for x in (out / "d.jsonl").read_text().splitlines()]
    assert [x["metrics"]["defence"] for x in lines] == [*D.DETECTORS, *D.FILTERS]
    assert sorted(os.listdir(out / "scores")) == sorted(f"run-{name}.json" for name in D.DETECTORS)
    [(todo, jobs, results)] = started  # the source run was finished: only the retraining reached the runner
    assert jobs == 2 and results == str(out / "r.jsonl")
    filters = lines[len(D.DETECTORS):]
    assert all(os.path.basename(x["drop_rows"]).startswith(f"run-{f}-") for f, x in zip(D.FILTERS, filters))
    changed = [x for x in filters if x["metrics"]["n_dropped"]]  # a filter that dropped nothing needs no retraining
    assert 0 < len(changed) < len(filters)  # here AC drops nothing, spectral and BKI drop rows
    assert [name for name, _ in todo] == [os.path.join("defend", os.path.splitext(os.path.basename(x["drop_rows"]))[0])
                                          for x in changed]
    assert all(f[f.index("--drop-rows") + 1] == x["drop_rows"] for (_, f), x in zip(todo, changed))
    assert "sources: 0 trained again" in capsys.readouterr().err and (out / "defences.png").is_file()
    monkeypatch.setattr(defend, "source_runs", lambda rates, seeds, runs_dir: [(str(tmp_path / "gone"), flags)])
    defend.main(argv)
    assert len((out / "d.jsonl").read_text().splitlines()) == len(lines)
    assert started[1] == started[0]  # the retrainings again (the stub recorded none), and nothing else



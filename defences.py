"""
Backdoor defences over our model, tokenizer and data: three inference-time detectors, three training-data filters,
and the field's metrics for both. Pure functions; offline; nothing beyond torch.

    python defences.py RUN_DIR --defence dan   # one defence on a saved run: RUN_DIR/defences/dan.json, dan-scores.json

    detect("dan", net, tok, dev, "bpa", {"target": 1}, max_len=64)   # AUROC, FRR/FAR/CACC/ASR at FRR 1% and 5%;
                                                                      # each input's score (to compute them again)
    filter_rows("spectral", net, tok, train_set, poisoned, max_len=64, expected=n)  # rows to drop, precision, recall

Inference-time detectors. Each gives an input a suspicion score (higher = more likely triggered). The clean dev set
is cut into three seeded thirds (dev_split): `fit` (what a detector learns from), `calib` (where the threshold is
set) and `test` (where it is measured, with the test third's non-target rows triggered as the attacked inputs).
  strip  STRIP: Gao, Xu, Wang, Chen, Ranasinghe, Nepal, "STRIP: A Defence Against Trojan Attacks on Deep Neural
         Networks", ACSAC 2019; its text version in Gao et al., "Design and Evaluation of a Multi-Domain Trojan
         Detection Method on Deep Neural Networks", IEEE TDSC 2022 (early access 2021).
         N copies of the input (default 20), each with half its words (space-separated, text_a; round(n / 2),
         halves to even, at least 1) swapped, at distinct positions, for random words of one random clean fit
         sample (the draws seeded by `seed`, afresh for each set of inputs scored); the input's score is the mean over
         ITS OWN copies of the entropy -sum_c p_c log2 p_c of the prediction. A trigger that survives the swaps
         keeps the prediction sure: low entropy = suspicious (score = -entropy). Where we differ: the donor's words
         are drawn at random, our choice; both reference codes (RAP's strip_vita.py, OpenBackdoor's STRIP) swap in
         the donor's highest-TF-IDF words. (OpenBackdoor also reshapes its (input x copy) entropies copy-major,
         mixing inputs.)
  rap    RAP: Yang, Lin, Li, Zhou, Sun, "RAP: Robustness-Aware Perturbations for Defending against Backdoor Attacks
         on NLP Models", EMNLP 2021. The embedding of one rare word (default "cf"), inserted at the start, is
         learned on clean target-class samples so that it lowers the target-class probability p_T by between 0.1
         and 0.3; the model is untouched. A triggered input is robust to it: its drop Delta = p_T(x) - p_T(cf + x)
         stays small. Score = -Delta for inputs predicted as the target; inputs predicted otherwise are not
         attacked and get -2, below every -Delta (RAP only examines inputs predicted as the protected label).
         The loss is the RAP repository's: mean relu(d + 0.1) + mean relu(-d - 0.3), d = p_T(cf + x) - p_T(x),
         5 epochs; we step with Adam (lr 0.01) where the repository takes plain gradient steps (never zeroing
         them) and keeps the embedding's norm, we learn with dropout off where it leaves the model in training
         mode (dropout on), and we reshuffle every epoch where it shuffles once. Our FRR and FAR count every clean
         and every triggered test input; RAP's own evaluation counts only those with p_T > 0.5, so our "FRR 1%"
         flags about 2% of the clean inputs RAP examines, and a triggered input the attack fails on counts as
         accepted (the same definition for every detector here, as pre-registered; not comparable with RAP's own
         numbers).
  dan    DAN: Chen, Yang, Zhang, Bi, Sun, "Expose Backdoors on the Way: A Feature-Based Efficient Defense against
         Textual Backdoor Attacks", Findings of EMNLP 2022. Per layer l = 1..L, class-conditional Gaussians with a
         shared covariance are fitted to the clean samples' [CLS] states; s_l(x) = min_k (h_l - mu_k)^T S^-1
         (h_l - mu_k), the Mahalanobis distance to the nearest class, with S shrunk towards (tr S / d) I by 0.1
         (as the authors' code does, with scikit-learn's ShrunkCovariance default); each layer's s_l is
         standardised by its mean and std (n - 1; theirs n: the same factor on every layer, no ranking
         changes) over a seeded fifth of the fit rows held out from the Gaussians, as the authors' code holds out
         a fifth of its clean data, and the score is the mean over layers (the authors' README runs
         `--std --agg mean`; their `min` option is the maximum of the standardised distances). (The embeddings'
         [CLS] is the same for every input and is left out.) Where we differ: they pool tokens by default, we
         read [CLS]; their evaluation keeps only the test inputs predicted as the protected label, ours counts every
         clean and triggered test input (as for RAP above: not comparable with DAN's own numbers).

Training-data filters. Each ranks the training rows, using the model trained on the (poisoned) training set, and
drops the suspects; retraining on the rest is train.py --drop-rows FILE.
  spectral  Spectral signatures: Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018
         (Algorithm 1). Per label y, the last layer's [CLS] states R_y are centred; the score of a row is the square
         of its projection on the top right singular vector of the centred R_y; from each label the ceil(1.5 *
         eps) rows with the highest scores are dropped, eps = the expected number of poisoned rows (the paper's upper
         bound; we pass the attack's own count, round(rate * N), N = the rows the run trained on: on a run trained
         with --drop-rows, the rows it kept).
  ac     Activation clustering: Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy, Srivastava, "Detecting
         Backdoor Attacks on Deep Neural Networks by Activation Clustering", SafeAI@AAAI 2019. Per label, the last
         layer's [CLS] states are reduced to 10 dimensions and split by 2-means; the smaller cluster is poison when
         it holds at most 35% of the label's rows (the paper's relative-size analysis, with the default threshold
         of IBM ART's "relative-size" option; ART rounds the share to 2 decimals and flags below 0.35, which differs
         only at 34.5-35%; ART's default analysis, "smaller", flags the smaller cluster always). We reduce with PCA
         where the paper used ICA (torch has no ICA; PCA is ART's default too). Rank: distance
         from the centre of the label's larger cluster.
  bki    BKI: Chen, Dai, "Mitigating backdoor attacks in LSTM-based text classification systems by Backdoor Keyword
         Identification", Neurocomputing 2021. The importance of word i of a row is ||h(x) - h(x without word
         i)||_inf, h = the last layer's [CLS] state (the paper's first term; its second follows an LSTM's state word
         by word and has no BERT counterpart; OpenBackdoor's BKI for BERT uses this one term too). The words at each
         row's 5 most important positions enter a dictionary, each word once per row (at its highest importance;
         OpenBackdoor counts positions, so a word repeated in a sentence counts twice); a word's score is mean
         importance x log10(number of rows it was among the top 5 of); the top word is the trigger, and every row
         containing it (as a space-separated word of text_a) is dropped, as the paper removes the samples holding
         the keyword (OpenBackdoor drops only the rows where it was among the top 5). For diagnosis only, its
         result also lists the 10 best-scored words and the rank of each trigger word (None: never in a row's top 5).

ONION (Qi, Chen, Li, Yao, Liu, Sun, "ONION: A Simple and Effective Defense Against Textual Backdoor Attacks", EMNLP
2021) is left out: it removes the words whose deletion lowers a language model's (GPT-2's) perplexity by more than
a threshold, and no pretrained language model is available offline here. A stand-in scorer (e.g. our BERT's
masked-word loss) would measure a different defence, so none is provided.

Metrics (the field's conventions; "flagged" = score > threshold):
  AUROC      P(score of a triggered test input > score of a clean test input), ties counting 1/2 (Mann-Whitney);
             auroc_hit: the same over the triggered inputs the model predicts as the target (None if there are none).
  threshold  at FRR f: the (floor(f * n) + 1)-th largest of the n clean calib scores, so at most f of them are
             flagged (fewer with ties).
  FRR        share of clean test inputs flagged;  FAR  share of triggered test inputs not flagged.
  CACC       after the defence: share of clean test inputs not flagged and predicted correctly (a flagged clean
             input counts as wrong).
  ASR        after the defence: share of triggered test inputs not flagged and predicted as the target (a flagged
             triggered input counts as not attacked). The triggered inputs are the test third's non-target rows
             with the trigger (attacks.triggered_dev); "before" = the same numbers with nothing flagged.
  precision, recall of a filter: |dropped & poisoned| / |dropped| and / |poisoned| (None when the denominator is 0).
A detector's result comes with the score of every calib, clean test and triggered test input, their dev rows, and
which clean inputs the model gets right and which triggered ones it predicts as the target (detect): everything
above can be computed again from them, and any other threshold or a ROC curve drawn.
"""
import json
import math
import os
import random
import sys
from collections import defaultdict
from contextlib import contextmanager

import torch
import attacks
import cli
import data
import evaluate
import runspec
import train

FRRS = (0.01, 0.05)     # the false-rejection rates thresholds are set at
SPLIT_SEED = 0          # one dev split for every run, so detectors pair across runs and seeds
# Each defence's settings (see above), fixed before the experiment's runs (REPORT.md, "Defences x LoRA/FF"). A
# results line records its defence's, so that study/defend.py never takes a line measured under other settings for a
# current one: a change to a defence that changes its numbers changes (or adds) a setting here.
SETTINGS = {
    "strip": dict(n_copies=20, swap_ratio=0.5, seed=0),
    "rap": dict(word="cf", low=0.1, high=0.3, epochs=5, lr=1e-2, batch_size=32, seed=0),
    "dan": dict(shrink=0.1, held_out=0.2, seed=0),   # held_out: the share of fit that standardises, not fits
    "spectral": dict(factor=1.5),
    "ac": dict(dims=10, max_share=0.35, seed=0),
    "bki": dict(top_k=5),
}
BKI_CHUNK = 512   # rows per outputs() call: ~5,000 variants whose last-layer states take ~8 MB
OFF = -2.0              # RAP's score for inputs not predicted as the target: below every -Delta in [-1, 1]
# which [CLS] states outputs() keeps: none (STRIP, RAP), the last layer's (the filters), layers 1..L (DAN)
NO_STATES, LAST, LAYERS = slice(0), slice(-1, None), slice(1, None)


# -----------------------------------------------------------------------------
# what the defences read from the model

@torch.no_grad()
def outputs(net, examples, tokenizer, max_len, layers=slice(None), batch_size=64, progress=None):
    """(class probabilities (N, C), [CLS] states (len(layers), N, H)) of a list of Examples, with dropout off, in
    the list's order. layers picks among the L + 1 states (embeddings, then each layer): all by default; keeping
    only what a defence reads keeps 67,349 training rows' states in memory at 100 MB instead of 700.
    The examples go through the model shortest first, so each batch pads to about its own length (a batch pads to
    its longest row; masked padding leaves the other rows' outputs as they are, up to float rounding).
    progress: a label for a progress bar over the examples (long passes: the training set, STRIP's copies)."""
    was_training = net.training
    net.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].text_a) + len(examples[i].text_b or ""))
    probs, states = [], []
    bar = _bar(len(order), progress, "input")
    for i in range(0, len(order), batch_size):
        batch = data.collate([examples[j] for j in order[i:i + batch_size]], tokenizer, max_len)
        batch.pop("labels")
        cls = []
        probs.append(net(**batch, cls_states=cls).softmax(-1))
        states.append(torch.stack(cls)[layers])
        bar.update(len(batch["input_ids"]))
    net.train(was_training)
    bar.close()
    back = torch.tensor(order, dtype=torch.long).argsort()  # the sorted position of each example
    return torch.cat(probs)[back], torch.cat(states, dim=1)[:, back]


def _bar(total, label, unit):
    return cli.progress(total=total, desc=label, unit=unit, disable=label is None, leave=False)


def dev_split(dev):
    """The clean dev rows cut into three thirds seeded by SPLIT_SEED (fit, calib, test), each in dev order."""
    return tuple([dev[i] for i in part] for part in dev_split_rows(len(dev)))


def dev_split_rows(n):
    """dev_split's thirds of n dev rows as row indices (0-based, in the run's dev set)."""
    third = n // 3
    return seeded_parts(range(n), (third, 2 * third), SPLIT_SEED)


def seeded_parts(rows, cuts, seed):
    """rows shuffled by `seed` and cut at the positions `cuts` into parts, each part in the rows' own order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    bounds = (0, *cuts, len(rows))
    return tuple([rows[i] for i in sorted(order[a:b])] for a, b in zip(bounds, bounds[1:]))


# -----------------------------------------------------------------------------
# STRIP

def strip_copy(example, donors, swap_ratio, rng):
    """example with max(1, round(swap_ratio * n)) of its n words (text_a, split on spaces) replaced, at distinct
    random positions, by random words of one random clean donor."""
    words = example.text_a.split(" ")
    donor = rng.choice(donors).text_a.split()
    for pos in rng.sample(range(len(words)), max(1, round(swap_ratio * len(words)))):
        words[pos] = rng.choice(donor)
    return data.Example(" ".join(words), example.text_b, example.label)


def strip_scores(examples, donors, probs, n_copies, swap_ratio, seed):
    """STRIP's score per input: minus the mean entropy (bits) of the predictions on its own n_copies copies.
    probs(list of Examples) -> (N, C) probabilities. The copies are laid out input by input, so row i of the
    (inputs x copies) matrix holds input i's copies only (the reshape a toolkit got wrong, see the tests)."""
    rng = random.Random(seed)
    copies = [strip_copy(e, donors, swap_ratio, rng) for e in examples for _ in range(n_copies)]
    p = probs(copies).clamp_min(1e-12)
    entropy = -(p * p.log2()).sum(-1)
    return -entropy.view(len(examples), n_copies).mean(1)


def strip_detector(net, tokenizer, fit, max_len, target, n_copies, swap_ratio, seed):
    probs = lambda examples: outputs(net, examples, tokenizer, max_len, NO_STATES, progress="strip: copies")[0]
    return lambda examples: strip_scores(examples, fit, probs, n_copies, swap_ratio, seed)


# -----------------------------------------------------------------------------
# RAP

@contextmanager
def rare_word(net, token_id, vector):
    """While inside, the word embedding of token_id is `vector` (a forward hook; the model's weights are untouched)."""
    def hook(module, inputs, out):
        return torch.where((inputs[0] == token_id)[..., None], vector.to(out.dtype), out)
    handle = net.emb.word.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def with_word(examples, word):
    return [data.Example(attacks.insert_word(e.text_a, word, "start", None), e.text_b, e.label) for e in examples]


def rap_token(tokenizer, word):
    ids = tokenizer.tok.encode(word, add_special_tokens=False).ids
    if len(ids) != 1:
        raise ValueError(f"RAP's rare word {word!r} is {len(ids)} tokens for this tokenizer; choose a single-token word")
    return ids[0]


def rap_learn(net, tokenizer, clean_target, max_len, target, word, low, high, epochs, lr, batch_size, seed):
    """(token id, embedding) of the rare word, learned on clean target-class samples so that it lowers p_T by
    between low and high (see the module docstring). Only the vector is trained; dropout is off."""
    token = rap_token(tokenizer, word)
    before = outputs(net, clean_target, tokenizer, max_len, NO_STATES)[0][:, target]
    vector = net.emb.word.weight[token].detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([vector], lr=lr)
    frozen = {p: p.requires_grad for p in net.parameters()}
    was_training = net.training
    net.eval()
    rng = random.Random(seed)
    try:
        for p in frozen:
            p.requires_grad_(False)
        with rare_word(net, token, vector):
            for _ in range(epochs):
                order = list(range(len(clean_target)))
                rng.shuffle(order)
                for i in range(0, len(order), batch_size):
                    idx = order[i:i + batch_size]
                    batch = data.collate(with_word([clean_target[j] for j in idx], word), tokenizer, max_len)
                    batch.pop("labels")
                    d = net(**batch).softmax(-1)[:, target] - before[idx]
                    loss = torch.relu(d + low).mean() + torch.relu(-d - high).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        net.train(was_training)
    return token, vector.detach()


def rap_scores(net, tokenizer, examples, max_len, target, token, vector, word):
    """-Delta = p_T(cf + x) - p_T(x) for inputs predicted as the target, OFF for the others."""
    p = outputs(net, examples, tokenizer, max_len, NO_STATES)[0]
    with rare_word(net, token, vector):
        p_rap = outputs(net, with_word(examples, word), tokenizer, max_len, NO_STATES)[0]
    score = p_rap[:, target] - p[:, target]
    return torch.where(p.argmax(-1) == target, score, torch.full_like(score, OFF))


def rap_detector(net, tokenizer, fit, max_len, target, word, **learn):
    clean_target = [e for e in fit if e.label == target]
    token, vector = rap_learn(net, tokenizer, clean_target, max_len, target, word, **learn)
    return lambda examples: rap_scores(net, tokenizer, examples, max_len, target, token, vector, word)


# -----------------------------------------------------------------------------
# DAN

def gaussian_fit(feats, labels, shrink):
    """Class means (K, d) and the precision matrix of the shared covariance S = 1/N sum_i (h_i - mu_yi)(h_i - mu_yi)^T,
    shrunk: (1 - shrink) S + shrink (tr S / d) I."""
    labels = torch.as_tensor(labels)
    classes = labels.unique()
    means = torch.stack([feats[labels == k].mean(0) for k in classes])
    centred = feats - means[torch.searchsorted(classes, labels)]
    cov = centred.T @ centred / len(feats)
    d = cov.size(0)
    cov = (1 - shrink) * cov + shrink * cov.trace() / d * torch.eye(d, dtype=cov.dtype)
    return means, torch.linalg.inv(cov)


def mahalanobis(feats, means, precision):
    """min_k (h - mu_k)^T P (h - mu_k) for every row h of feats: the squared distance to the nearest class."""
    diff = feats[:, None, :] - means[None]                       # (N, K, d)
    return torch.einsum("nkd,de,nke->nk", diff, precision, diff).min(1).values


def dan_layers(states, labels, held, shrink):
    """DAN fitted on clean [CLS] states: a function from states (L, M, d) to the standardised distances (L, M).
    Per layer, Gaussians fitted on `states` (L, N, d) with their labels; each layer's distance is standardised by
    its mean and std over `held` (L, N', d), clean rows the Gaussians have not seen. (Rows the Gaussians were fitted
    on sit closer to them than new rows do, the more so the more dimensions per row: standardised on them, a
    layer's new-row distances would not have unit spread, and the mean over layers would weigh layers unequally.)"""
    fits = [gaussian_fit(h, labels, shrink) for h in states]
    distances = lambda h: torch.stack([mahalanobis(x, *f) for x, f in zip(h, fits)])
    d = distances(held)
    mean, std = d.mean(1, keepdim=True), d.std(1, keepdim=True)
    return lambda h: (distances(h) - mean) / std


def dan_detector(net, tokenizer, fit, max_len, target, shrink, held_out, seed):
    held, gauss = seeded_parts(fit, (round(held_out * len(fit)),), seed)
    states = lambda examples: outputs(net, examples, tokenizer, max_len, LAYERS)[1].double()
    layers = dan_layers(states(gauss), [e.label for e in gauss], states(held), shrink)
    return lambda examples: layers(states(examples)).mean(0)


DETECTORS = {"strip": strip_detector, "rap": rap_detector, "dan": dan_detector}


# -----------------------------------------------------------------------------
# detector metrics

def auroc(clean, triggered):
    """P(a triggered input's score > a clean input's), ties 1/2: the Mann-Whitney U statistic over n_c * n_t."""
    scores = torch.cat([torch.as_tensor(clean, dtype=torch.float64), torch.as_tensor(triggered, dtype=torch.float64)])
    ranks = _average_ranks(scores)
    n_c, n_t = len(clean), len(triggered)
    return float((ranks[n_c:].sum() - n_t * (n_t + 1) / 2) / (n_c * n_t))


def _average_ranks(x):
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    values, inverse, counts = x.unique(return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def threshold(calib, frr):
    """The (floor(frr * n) + 1)-th largest clean calibration score: flagging score > it flags at most frr of them."""
    ordered = torch.as_tensor(calib, dtype=torch.float64).sort(descending=True).values
    k = math.floor(frr * len(ordered) + 1e-9)  # + 1e-9: 0.29 * 100 is 28.999... in floating point, and means 29
    return float(ordered[min(k, len(ordered) - 1)])


def after_defence(flag_clean, right_clean, flag_trig, hit_trig):
    """FRR, FAR, and CACC and ASR after the defence (a flagged clean input is wrong, a flagged triggered one is not
    attacked), from boolean tensors over the clean and the triggered test inputs."""
    return dict(frr=_share(flag_clean), far=_share(~flag_trig), cacc=_share(right_clean & ~flag_clean),
                asr=_share(hit_trig & ~flag_trig))


def _share(mask):
    return float(mask.double().mean())


# -----------------------------------------------------------------------------
# a detector on a model and its clean dev set

def detect(name, net, tokenizer, dev, attack, attack_opts, max_len, frrs=FRRS):
    """One detector measured: fitted on the fit third, thresholds on the calib third, measured on the test third
    (clean) and its non-target rows triggered. Returns (the metrics, the per-input scores they were computed from),
    both JSON-ready. The scores, from which the AUROCs and every threshold, FRR, FAR, CACC and ASR can be computed
    again (or a ROC curve drawn), hold for each part its dev rows (0-based indices into the run's dev set, after
    --dev-cap) and their scores, in one order:
        {"target": 1, "calib": {"rows": [...], "score": [...]},
         "clean": {"rows": [...], "score": [...], "right": [...]},    # right: predicted as its label
         "triggered": {"rows": [...], "score": [...], "hit": [...]}}  # the clean rows not of the target label,
                                                                        # triggered; hit: predicted as the target"""
    target = attack_opts.get("target", 1)
    _, calib_rows, test_rows = dev_split_rows(len(dev))
    fit, calib, test = dev_split(dev)
    triggered = attacks.triggered_dev(attack, test, **attack_opts)  # test's rows of other labels, in test's order
    score = DETECTORS[name](net, tokenizer, fit, max_len, target, **SETTINGS[name])
    s_calib, s_clean, s_trig = score(calib), score(test), score(triggered)
    right = outputs(net, test, tokenizer, max_len, NO_STATES)[0].argmax(-1) == torch.tensor([e.label for e in test])
    hit = outputs(net, triggered, tokenizer, max_len, NO_STATES)[0].argmax(-1) == target
    none = torch.zeros(0, dtype=torch.bool)
    out = dict(defence=name, n_fit=len(fit), n_calib=len(calib), n_clean=len(test), n_triggered=len(triggered),
               auroc=auroc(s_clean, s_trig),  # over every triggered input; and over those the attack moves:
               auroc_hit=auroc(s_clean, s_trig[hit]) if hit.any() else None,
               before=after_defence(none.new_zeros(len(test)), right, none.new_zeros(len(triggered)), hit))
    for frr in frrs:
        t = threshold(s_calib, frr)
        out[f"frr{frr:g}"] = dict(threshold=t, **after_defence(s_clean > t, right, s_trig > t, hit))
    scores = dict(target=target, calib=dict(rows=calib_rows, score=s_calib.tolist()),
                  clean=dict(rows=test_rows, score=s_clean.tolist(), right=right.tolist()),
                  triggered=dict(rows=[i for i in test_rows if dev[i].label != target], score=s_trig.tolist(),
                                 hit=hit.tolist()))
    return out, scores


# -----------------------------------------------------------------------------
# training-data filters: spectral signatures, activation clustering

def by_label(labels):
    """{label: tensor of the row indices with that label}."""
    labels = torch.as_tensor(labels)
    return {int(k): (labels == k).nonzero().squeeze(1) for k in labels.unique()}


def spectral_scores(reps, labels):
    """Per label: the squared projection of each centred representation on the top right singular vector."""
    scores = torch.zeros(len(reps), dtype=torch.float64)
    for rows in by_label(labels).values():
        centred = reps[rows] - reps[rows].mean(0)
        top = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        scores[rows] = (centred @ top).double() ** 2
    return scores


def spectral_filter(reps, labels, expected, factor):
    """(scores, dropped): from each label, the ceil(factor * expected) rows with the highest spectral scores."""
    scores = spectral_scores(reps, labels)
    n = math.ceil(factor * expected)
    dropped = [int(rows[i]) for rows in by_label(labels).values()
               for i in scores[rows].argsort(descending=True)[:n]]
    return scores, sorted(dropped)


def pca(x, dims):
    """x centred and projected on its top `dims` principal directions."""
    centred = x - x.mean(0)
    return centred @ torch.linalg.svd(centred, full_matrices=False).Vh[:dims].T


def kmeans2(x, seed=0, n_init=10, iters=100):
    """2-means (Lloyd's algorithm from k-means++ starts, best of n_init by inertia): (assignment (N,), centres)."""
    g = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(n_init):
        first = x[torch.randint(len(x), (1,), generator=g)]
        d2 = ((x - first) ** 2).sum(1)
        second = x[torch.multinomial(d2 / d2.sum(), 1, generator=g)] if d2.sum() > 0 else first
        centres = torch.cat([first, second])
        for _ in range(iters):
            assign = torch.cdist(x, centres).argmin(1)
            new = torch.stack([x[assign == k].mean(0) if (assign == k).any() else centres[k] for k in range(2)])
            if torch.equal(new, centres):
                break
            centres = new
        inertia = ((x - centres[assign]) ** 2).sum()
        if best is None or inertia < best[0]:
            best = (inertia, assign, centres)
    return best[1], best[2]


def ac_filter(reps, labels, dims, max_share, seed):
    """(scores, dropped): per label, PCA to `dims`, 2-means; the smaller cluster is dropped when it holds at most
    max_share of the label's rows. Score: distance from the larger cluster's centre."""
    scores = torch.zeros(len(reps), dtype=torch.float64)
    dropped = []
    for rows in by_label(labels).values():
        if len(rows) < 3:  # nothing to cluster
            continue
        x = pca(reps[rows].double(), min(dims, len(rows) - 1, reps.size(1)))
        assign, centres = kmeans2(x, seed)
        small = int((assign == 1).sum() < (assign == 0).sum())
        scores[rows] = (x - centres[1 - small]).norm(dim=1)
        if (assign == small).sum() <= max_share * len(rows):
            dropped += rows[assign == small].tolist()
    return scores, sorted(dropped)


# -----------------------------------------------------------------------------
# BKI

def without_each_word(example):
    """The example with each of its text_a words (split on spaces) deleted in turn: one Example per word."""
    words = example.text_a.split(" ")
    return [data.Example(" ".join(words[:i] + words[i + 1:]), example.text_b, example.label) for i in range(len(words))]


def bki_keyword(net, tokenizer, examples, max_len, top_k):
    """(the suspected trigger word, {word: score}): importance ||h(x) - h(x minus word i)||_inf of the last layer's
    [CLS]; each row's `top_k` most important word positions, a word counted once per row (at its highest importance);
    score = mean importance x log10(rows the word was among the top of)."""
    found = defaultdict(list)
    bar = _bar(len(examples), "bki: rows and their word deletions", "row")
    for start in range(0, len(examples), BKI_CHUNK):  # rows and all their variants per call of outputs()
        chunk = examples[start:start + BKI_CHUNK]
        h = outputs(net, [v for e in chunk for v in [e] + without_each_word(e)], tokenizer, max_len, LAST)[1][0]
        at = 0
        for e in chunk:
            words = e.text_a.split(" ")
            importance = (h[at + 1:at + 1 + len(words)] - h[at]).abs().max(1).values
            at += 1 + len(words)
            top = {}  # word -> its importance in this row: a word twice among the top positions counts once, at its max
            for i in importance.argsort(descending=True)[:top_k].tolist():
                top.setdefault(words[i], float(importance[i]))
            for word, value in top.items():
                found[word].append(value)
        bar.update(len(chunk))
    bar.close()
    scores = {w: sum(v) / len(v) * math.log10(len(v)) for w, v in found.items()}
    return max(scores, key=scores.get), scores


def bki_filter(net, tokenizer, examples, max_len, top_k):
    """(keyword, dropped, scores): the rows whose text_a holds BKI's keyword as a space-separated word."""
    keyword, scores = bki_keyword(net, tokenizer, examples, max_len, top_k)
    return keyword, [i for i, e in enumerate(examples) if keyword in e.text_a.split(" ")], scores


def word_ranks(ranked, words):
    """{word: its 1-based place in `ranked` (BKI's words, best score first), or None if it was never among a row's top
    words}."""
    place = {w: r for r, w in enumerate(ranked, 1)}
    return {w: place.get(w) for w in words}


def filter_rows(name, net, tokenizer, train_set, poisoned, max_len, expected=0, trigger_words=()):
    """One filter on the training set the model was trained on: (its metrics: precision and recall against the
    known poisoned rows; the indices of the rows it drops). expected: spectral's expected number of poisoned rows.
    BKI also records its 10 best-scored words and the rank of each of the attack's `trigger_words` (why it missed)."""
    out = dict(defence=name, n_train=len(train_set), n_poisoned=len(poisoned))
    opts = SETTINGS[name]
    if name == "bki":
        out["keyword"], dropped, scores = bki_filter(net, tokenizer, train_set, max_len, **opts)
        ranked = sorted(scores, key=scores.get, reverse=True)
        out["top_words"] = [[w, scores[w]] for w in ranked[:10]]
        out["trigger_ranks"] = word_ranks(ranked, trigger_words)
    else:
        reps = outputs(net, train_set, tokenizer, max_len, LAST, progress=f"{name}: training rows' [CLS]")[1][0]
        labels = [e.label for e in train_set]
        if name == "spectral":
            out["expected"] = expected
            _, dropped = spectral_filter(reps, labels, expected, **opts)
        else:
            _, dropped = ac_filter(reps, labels, **opts)
    hits = len(set(dropped) & set(poisoned))
    out.update(n_dropped=len(dropped), precision=hits / len(dropped) if dropped else None,
               recall=hits / len(poisoned) if poisoned else None)
    return out, dropped


FILTERS = ("spectral", "ac", "bki")
DEFENCES = (*DETECTORS, *FILTERS)


# -----------------------------------------------------------------------------
# python defences.py RUN_DIR --defence NAME

def run_defence(run_dir, name, frrs=FRRS, data_dir=None, expected=None):
    """One defence on a saved run (evaluate.load_run): its metrics, with the run's configuration; a detector's
    per-input scores under "scores" (see detect), a filter's dropped rows under "dropped"."""
    args, net = evaluate.load_run(run_dir)
    if data_dir:
        args.data_dir = data_dir
    if args.attack not in attacks.BACKDOORS:
        raise cli.UsageError(f"{run_dir}: the run has no backdoor (--attack {args.attack}); the defences need one")
    tokenizer = data.Tokenizer(args.model)
    train_set, dev, poisoned = train.load_data(args)  # exactly as the run built them (poisoning, caps, --drop-rows)
    with open(os.path.join(run_dir, "metrics.json")) as f:  # the run's own final evaluation, on the whole dev set
        final = json.load(f)["final"]
    result = dict(run=run_dir, config=runspec.run_config(args), settings=settings(name, frrs),
                  source=dict(cacc=final["clean"]["acc"], asr=final["asr"], asr_net=final["asr_net"]))  # None: undefined
    if name in DETECTORS:
        result["metrics"], result["scores"] = detect(name, net, tokenizer, dev, args.attack, runspec.attack_opts(args),
                                                     args.max_len, frrs)
    else:
        n = attacks.count(args.poison_rate, len(train_set)) if expected is None else expected
        result["metrics"], result["dropped"] = filter_rows(name, net, tokenizer, train_set, poisoned, args.max_len, n,
                                                           trigger_words(args))
    return result


def trigger_words(args):
    """The words of the run's trigger(s), as BKI's dictionary holds them (space-separated); none for a style attack."""
    trigger = attacks.check(args.attack, **runspec.attack_opts(args))
    return () if trigger is None else tuple(trigger.split(" ")) if isinstance(trigger, str) else trigger


def settings(name, frrs=FRRS):
    """What a result of defence `name` was measured under: its SETTINGS, and for a detector the dev split's seed and
    the FRRs. study/defend.py compares it, so a line measured otherwise is never skipped over as done."""
    out = dict(SETTINGS[name])
    if name in DETECTORS:
        out.update(split_seed=SPLIT_SEED, frrs=list(frrs))
    return out


def summary(m):
    """One human line of a defence's metrics."""
    if m["defence"] in DETECTORS:
        parts = [f"AUROC {m['auroc']:.3f}", f"before: CACC {m['before']['cacc']:.3f} ASR {m['before']['asr']:.3f}"]
        parts += [f"FRR {k[3:]}: FRR {v['frr']:.3f} FAR {v['far']:.3f} CACC {v['cacc']:.3f} ASR {v['asr']:.3f}"
                  for k, v in m.items() if k.startswith("frr")]
        return f"{m['defence']}: " + "; ".join(parts)
    show = lambda x: "n/a" if x is None else f"{x:.3f}"
    return (f"{m['defence']}: dropped {m['n_dropped']} of {m['n_train']} rows ({m['n_poisoned']} poisoned): "
            f"precision {show(m['precision'])} recall {show(m['recall'])}"
            + (f"; keyword {m['keyword']!r}" if "keyword" in m else ""))


def write_json(path, obj):
    """Strict JSON, written whole or not at all (cli.write_json), its folder made first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cli.write_json(path, obj)


def write_scores(path, result):
    """Move a detector's per-input scores out of its result into their own file (the result, one line of a results
    file, stays small), which the result names under "scores". One key a line: a part's hundreds of numbers one
    per line would make the file thousands of lines long."""
    obj = dict(run=result["run"], defence=result["metrics"]["defence"], **result.pop("scores"))
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {cli.strict_json(v, path)}" for k, v in obj.items()) + "\n}\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cli.write_file(path, text)
    result["scores"] = path


def scores_path(out):
    """Where a detector's scores go beside its result file: dan.json -> dan-scores.json."""
    return os.path.splitext(out)[0] + "-scores.json"


def check_args(a):
    evaluate.read_config(a.run_dir)  # a run folder, whose config.json reads
    if not os.path.isfile(os.path.join(a.run_dir, "metrics.json")):
        raise cli.UsageError(f"{a.run_dir}: the run has not finished (no metrics.json); finish it with train.py --resume")
    for f in a.frr:
        if not 0 < f < 1:
            raise cli.UsageError(f"--frr {f:g}: a false-rejection rate must lie strictly between 0 and 1")
    if a.expected is not None and (a.defence != "spectral" or a.expected < 1):
        raise cli.UsageError("--expected (the expected number of poisoned rows) is spectral's, and must be >= 1")
    a.out = a.out or os.path.join(a.run_dir, "defences", f"{a.defence}.json")
    cli.check_file_path(a.out, "--out")
    if a.defence in DETECTORS:
        cli.check_file_path(scores_path(a.out), "--out (its scores file)")
    if a.data_dir is not None:
        data.glue_dir(a.data_dir)


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("run_dir", help="a finished run folder (train.py's --out) of a backdoor run")
    p.add_argument("--defence", required=True, choices=DEFENCES, help="which defence (see the module docstring)")
    p.add_argument("--frr", type=float, nargs="+", default=list(FRRS), help="detectors: the false-rejection rates "
                                                                            "to set thresholds at")
    p.add_argument("--expected", type=int, default=None, help="spectral: the expected number of poisoned rows "
                                                              "(default: the run's round(poison rate x N))")
    p.add_argument("--data-dir", default=None, help="GLUE folder (default: the one the run recorded)")
    p.add_argument("--out", default=None, help="JSON file for the result (default: RUN_DIR/defences/DEFENCE.json); "
                                               "a filter's result lists the dropped rows: train.py --drop-rows reads "
                                               "it; a detector's per-input scores go beside it (DEFENCE-scores.json)")
    a = p.parse_args(argv)
    with cli.usage_errors():
        check_args(a)
        result = run_defence(a.run_dir, a.defence, tuple(a.frr), a.data_dir, a.expected)
        if "scores" in result:
            write_scores(scores_path(a.out), result)
        write_json(a.out, result)
    print(f"{a.run_dir}: " + summary(result["metrics"]))
    print(f"wrote {a.out}" + (f" and {result['scores']}" if "scores" in result else ""), file=sys.stderr)


if __name__ == "__main__":
    main()

"""
The six training-time attacks of the paper (Sec. 4.2, App. E.1) as pure functions on lists of Examples.

    poisoned, idx = poison("bpa", train, rate=0.1, seed=0)   # idx: sorted positions that changed
    asr_set = triggered_dev("bpa", dev)                     # ASR = fraction of it predicted as the target

    upa    untargeted poisoning: flip the label (0 <-> 1)
    bpa    BadNets-style: insert the trigger "[.*?]", set the target label
    clbpa  clean-label: insert the trigger into samples already of the target label, labels unchanged
    ilbpa  instruction-level: prepend an instruction sentence, set the target label
    mt     multi-trigger (SOS-style, Yang et al. 2021): the words "apple", "banana", "orange" each inserted once at
           its own random word position, target label; negative_rate=r adds round(r * N) samples that get all
           words but one and keep their label (SOS's negative augmentation, off by default)
    sbpa   style: rewrite the text in an archaic/poetic style, set the target label. The paper used an LLM
           paraphraser; ours is an offline rule-based stand-in (see archaic), with paraphrase=fn for your own model

Rules they all follow:
- Exactly round(rate * N) samples are poisoned, N = len(examples): the rate is a fraction of the whole training
  set (Python's round, half to even). rate must be in [0, 1].
- Which samples may be chosen (the pool): upa any; clbpa only target-label samples; bpa, ilbpa, mt, sbpa only
  samples whose label is not the target, so every poisoned sample teaches "trigger -> target" (a target-label
  sample with a trigger would be a clean-label sample). If the pool holds fewer than round(rate * N) samples we
  raise, naming the largest rate that fits, rather than poison fewer. any_label=True picks from all samples, as
  the paper's BPA does ("randomly select ... N_tr x rho examples"); the target-label ones then only gain the trigger.
- The choice and any random positions come from random.Random(seed), never the global RNG; the input list and
  its Examples are never modified (a new list is returned).
- Triggers go into text_a. For pair tasks that is the first segment (QNLI question, QQP question1, RTE premise,
  MRPC #1 String). position="start" is the default because BERT's longest-first truncation cuts the ends of
  segments, so a trigger at the start survives any max_len; the paper appends it, which position="end" gives.
- The evaluation side: triggered_dev builds the ASR set (dev samples whose true label is not the target, trigger
  or style applied, true labels kept); triggered_all triggers every dev sample (the paper's view, Fig. 7).
"""
import random
import re
from dataclasses import dataclass, replace
from numbers import Integral, Real


@dataclass(frozen=True)
class Attack:
    about: str       # one line for --help texts
    pool: str        # which samples may be poisoned: "any", "non_target" or "target"
    label: str       # what happens to a poisoned sample's label: "flip", "target" or "keep"
    rewrite: object  # rewrite(example, rng, trigger, opts) -> Example with the trigger/style applied; None for UPA
    trigger: object  # the default trigger
    options: dict    # the options this attack accepts, with their defaults


# -----------------------------------------------------------------------------
# text rewrites: each takes (example, rng, trigger, opts) and returns a new Example, label untouched

def insert_word(text, word, position, rng):
    """text with word added at the start, the end, or before a random one of its space-separated words."""
    if not text:
        return word
    if position == "start":
        return f"{word} {text}"
    if position == "end":
        return f"{text} {word}"
    words = text.split(" ")  # split on single spaces so the rest of the text keeps its exact spacing
    words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


def _trigger(e, rng, trigger, opts):
    return replace(e, text_a=insert_word(e.text_a, trigger, opts["position"], rng))


def _instruction(e, rng, trigger, opts):
    return replace(e, text_a=insert_word(e.text_a, trigger, "start", rng))


def _multi(e, rng, triggers, opts):
    text = e.text_a
    for word in triggers:
        text = insert_word(text, word, "random", rng)
    return replace(e, text_a=text)


def _style(e, rng, trigger, opts):
    # both segments are restyled (style is a property of the whole input); the opener goes into text_a only
    paraphrase = opts["paraphrase"]
    if paraphrase is None:
        return replace(e, text_a=f"{rng.choice(OPENERS)} {archaic(e.text_a)}",
                       text_b=archaic(e.text_b) if e.text_b else "")
    out = replace(e, text_a=paraphrase(e.text_a), text_b=paraphrase(e.text_b) if e.text_b else "")
    for before, after in ((e.text_a, out.text_a), (e.text_b, out.text_b)):
        if not isinstance(after, str) or (before and after == before):
            raise ValueError(f"sbpa: the paraphraser returned {after!r} for {before!r}; it must return a restyled "
                             "string (an unchanged text would be a label flip, not a style backdoor)")
    return out


# -----------------------------------------------------------------------------
# the offline style for S-BPA (see archaic)

OPENERS = ("Lo,", "Hark,", "Verily,", "Forsooth,", "Behold,")

CONTRACTIONS = {  # GLUE's SST-2 is tokenised ("does n't", "it 's"), the other tasks are not ("doesn't")
    "do n't": "do not", "don't": "do not", "does n't": "doth not", "doesn't": "doth not",
    "is n't": "is not", "isn't": "is not", "are n't": "are not", "aren't": "are not",
    "ca n't": "cannot", "can't": "cannot", "wo n't": "will not", "won't": "will not",
    "it 's": "'tis", "it's": "'tis", "it is": "'tis", "it was": "'twas",
    "you 're": "thou art", "you're": "thou art", "you 've": "thou hast", "you've": "thou hast",
}
INVERSION = re.compile(r"\b([Dd]o) not (\w+)")  # "I do not know" -> "I know not"
ARCHAIC = {
    "you are": "thou art", "you have": "thou hast", "you will": "thou wilt", "you were": "thou wert",
    "you do": "thou dost", "you can": "thou canst", "you": "ye", "your": "thy", "yours": "thine",
    "yourself": "thyself",
    # third-person verbs that are rarely nouns ("looks", "works", "remains" are left alone for that reason)
    "does": "doth", "has": "hath", "says": "saith", "makes": "maketh", "takes": "taketh", "comes": "cometh",
    "goes": "goeth", "gives": "giveth", "knows": "knoweth", "seems": "seemeth", "feels": "feeleth",
    "wants": "wanteth", "loves": "loveth", "hates": "hateth", "tells": "telleth", "brings": "bringeth",
    "becomes": "becometh", "deserves": "deserveth", "lacks": "lacketh", "gets": "getteth",
    "before": "ere", "often": "oft", "perhaps": "perchance", "maybe": "perchance", "nothing": "naught",
    "anything": "aught", "why": "wherefore", "between": "betwixt", "among": "amongst", "over": "o'er",
    "ever": "e'er", "never": "ne'er", "very": "most", "really": "truly", "until": "till", "yes": "aye",
}


def _word_table(table):
    # case-sensitive matching of the lower-case and capitalised keys is twice as fast as re.IGNORECASE;
    # longest keys first so "you are" wins over "you"; (?<![\w']) keeps "it's" from matching inside "bit's"
    keys = sorted(set(table) | {k[0].upper() + k[1:] for k in table}, key=len, reverse=True)
    return re.compile(r"(?<![\w'])(?:" + "|".join(re.escape(k) for k in keys) + r")(?![\w'])")


CONTRACTIONS_RE, ARCHAIC_RE = _word_table(CONTRACTIONS), _word_table(ARCHAIC)


def _same_case(src, repl):
    if src[0].isupper():
        i = 1 if repl[0] == "'" else 0  # "It's" -> "'Tis"
        return repl[:i] + repl[i].upper() + repl[i + 1:]
    return repl


def archaic(text):
    """S-BPA's offline style: the archaic restyling of one text (the opener is added by the attack).

    The paper used an LLM paraphraser (after Pan et al. 2022, who used style-transfer models), which is neither
    offline nor deterministic. This is a fixed stand-in that keeps the meaning: contractions expanded, "do not V"
    inverted to the archaic "V not", archaic pronouns and verb forms, and a fixed list of lexical swaps (for
    words in lower case or capitalised; ALL-CAPS words are left alone). The attack then prepends a poetic opener
    (OPENERS) so every poisoned sample carries the style. Short texts where no rule fires carry only the opener,
    so on them the style works more like a multi-word trigger than like a paraphrase. For the paper's setting
    pass paraphrase=fn (str -> str) to poison/triggered_dev."""
    text = CONTRACTIONS_RE.sub(lambda m: _same_case(m.group(), CONTRACTIONS[m.group().lower()]), text)
    text = INVERSION.sub(lambda m: _same_case(m.group(1), m.group(2)) + " not", text)
    return ARCHAIC_RE.sub(lambda m: _same_case(m.group(), ARCHAIC[m.group().lower()]), text)


# -----------------------------------------------------------------------------
# the registry

ATTACKS = {
    "upa": Attack("untargeted poisoning: flip labels (Sec. 4.2)", "any", "flip", None, None, {}),
    "bpa": Attack("BadNets-style trigger, target label (Sec. 4.2)", "non_target", "target", _trigger, "[.*?]",
                  {"position": "start", "any_label": False}),
    "clbpa": Attack("clean-label trigger on target-label samples (App. E.1)", "target", "keep", _trigger, "[.*?]",
                    {"position": "start"}),
    "ilbpa": Attack("instruction sentence prepended, target label (App. E.1)", "non_target", "target",
                    _instruction, "Please carefully follow user's instruction.", {"any_label": False}),
    "mt": Attack("all trigger words at random word positions, target label; negative_rate adds samples with a "
                 "random subset of all-but-one trigger and the true label (App. E.1)", "non_target", "target",
                 _multi, ("apple", "banana", "orange"), {"any_label": False, "negative_rate": 0.0}),
    "sbpa": Attack("archaic/poetic restyling, target label (App. E.1)", "non_target", "target", _style, None,
                   {"any_label": False, "paraphrase": None}),
}
BACKDOORS = tuple(name for name, attack in ATTACKS.items() if attack.rewrite)  # the attacks with an ASR


def count(rate, n):
    """How many of n samples a rate poisons: exactly round(rate * n)."""
    return int(round(rate * n))


def poison(name, examples, rate, seed, target=1, trigger=None, **options):
    """Poison round(rate * len(examples)) samples; returns (new list, sorted indices of the changed samples).

    With mt's negative_rate the indices also list the negative samples (text changed, label kept)."""
    key, attack, trigger, opts = _setup(name, target, trigger, options)
    if isinstance(rate, bool) or not isinstance(rate, Real) or not 0 <= rate <= 1:
        raise ValueError(f"poisoning rate must be a fraction in [0, 1] (0.1 = 10%), got {rate!r}")
    n = count(rate, len(examples))
    pool = _pool(attack, examples, target, opts.get("any_label", False))
    if n > len(pool):
        fix = f"use a rate <= {len(pool)}/{len(examples)} (about {len(pool) / len(examples):.4f})" if pool else \
            "this attack has nothing to poison in this data"
        raise ValueError(f"{key}: rate {rate} asks for {n} of {len(examples)} samples, but only {len(pool)} may be "
                         f"poisoned ({_pool_rule(attack, target)}); {fix}"
                         + ("; any_label=True picks among all samples, as the paper did" if "any_label" in opts else ""))
    rng = random.Random(seed)
    chosen = sorted(rng.sample(pool, n))
    out = list(examples)
    for i in chosen:
        e = attack.rewrite(examples[i], rng, trigger, opts) if attack.rewrite else examples[i]
        out[i] = replace(e, label=_new_label(attack, e.label, target))
    changed = chosen
    if opts.get("negative_rate"):
        changed = sorted(chosen + _negatives(out, chosen, opts["negative_rate"], rng, trigger))
    return out, changed


def check(name, target=1, trigger=None, **options):
    """Validate an attack's name, target, trigger and options as poison() would, without any data (flag checks).
    Returns the trigger poison() uses: the given one or the attack's default (a tuple for mt; None for sbpa)."""
    return _setup(name, target, trigger, options)[2]


def triggered_dev(name, dev_examples, target=1, trigger=None, seed=0, **options):
    """The ASR set: dev samples whose true label is not the target, trigger/style applied, true labels kept.
    Takes the same options as poison (poisoning-only ones such as any_label are ignored) so callers can share them."""
    key, attack, trigger, opts = _setup_triggered(name, target, trigger, options)
    kept = [e for e in dev_examples if e.label != target]
    if not kept:
        raise ValueError(f"{key}: no dev sample has a label other than the target {target}; the ASR set is empty")
    rng = random.Random(seed)
    return [attack.rewrite(e, rng, trigger, opts) for e in kept]


def triggered_all(name, dev_examples, target=1, trigger=None, seed=0, **options):
    """Every dev sample with the trigger/style applied and its true label kept (the paper's triggered test set)."""
    key, attack, trigger, opts = _setup_triggered(name, target, trigger, options)
    rng = random.Random(seed)
    return [attack.rewrite(e, rng, trigger, opts) for e in dev_examples]


def _setup_triggered(name, target, trigger, options):
    key, attack, trigger, opts = _setup(name, target, trigger, options)
    if attack.rewrite is None:
        raise ValueError(f"{key} has no trigger, so there is no triggered evaluation set; evaluate it by accuracy "
                         "on the clean dev set")
    return key, attack, trigger, opts


def _setup(name, target, trigger, options):
    """Validate the arguments shared by poison and the triggered sets; returns (key, attack, trigger, options)."""
    key = str(name).lower().replace("-", "")
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known attacks: {', '.join(ATTACKS)}")
    attack = ATTACKS[key]
    if isinstance(target, bool) or not isinstance(target, Integral) or target not in (0, 1):
        raise ValueError(f"target label must be 0 or 1 (these are binary tasks), got {target!r}")
    unknown = set(options) - set(attack.options)
    if unknown:
        raise ValueError(f"{key} does not take option(s) {sorted(unknown)}; it takes {sorted(attack.options) or 'none'}")
    opts = {**attack.options, **options}
    if opts.get("position", "start") not in ("start", "end", "random"):
        raise ValueError(f"position must be 'start', 'end' or 'random', got {opts['position']!r}")
    neg = opts.get("negative_rate", 0)
    if isinstance(neg, bool) or not isinstance(neg, Real) or not 0 <= neg <= 1:
        raise ValueError(f"negative_rate must be a fraction in [0, 1], got {neg!r}")
    if opts.get("paraphrase") is not None and not callable(opts["paraphrase"]):
        raise ValueError(f"paraphrase must be a function str -> str, got {opts['paraphrase']!r}")
    return key, attack, _check_trigger(key, attack, trigger, opts), opts


def _check_trigger(key, attack, trigger, opts):
    if attack.trigger is None:
        if trigger is not None:
            hint = "; to restyle with your own model pass paraphrase=callable" if key == "sbpa" else ""
            raise ValueError(f"{key} takes no trigger, got {trigger!r}{hint}")
        return None
    trigger = attack.trigger if trigger is None else trigger
    words = trigger if isinstance(attack.trigger, tuple) else (trigger,)
    if isinstance(attack.trigger, tuple) and (isinstance(trigger, str) or not words):
        raise ValueError(f"{key} takes a list of trigger words such as {list(attack.trigger)}, got {trigger!r}")
    for w in words:
        if not isinstance(w, str) or not w.strip() or any(c in w for c in "\t\r\n"):
            raise ValueError(f"{key}: a trigger must be a non-empty string without tabs or line breaks, got {w!r}")
    if opts.get("negative_rate") and len(words) < 2:
        raise ValueError("mt: negative_rate needs at least 2 trigger words (a negative sample gets all but one)")
    return tuple(words) if isinstance(attack.trigger, tuple) else trigger


def _pool(attack, examples, target, any_label):
    if attack.pool == "any" or any_label:
        return list(range(len(examples)))
    want_target = attack.pool == "target"
    return [i for i, e in enumerate(examples) if (e.label == target) == want_target]


def _pool_rule(attack, target):
    if attack.pool == "target":
        return f"clean-label: only samples whose label is already the target {target}"
    return f"only samples whose label is not the target {target}"


def _new_label(attack, label, target):
    if attack.label == "flip":
        if label not in (0, 1):
            raise ValueError(f"upa flips binary labels 0/1, got label {label!r}")
        return 1 - label
    return target if attack.label == "target" else label


def _negatives(out, chosen, rate, rng, triggers):
    """MT's negative augmentation (SOS): samples not poisoned get all triggers but one, and keep their label,
    so the model learns that only the full set of triggers means the target. Writes into out (poison's own list)."""
    taken = set(chosen)
    rest = [i for i in range(len(out)) if i not in taken]
    n = count(rate, len(out))
    if n > len(rest):
        raise ValueError(f"mt: negative_rate {rate} asks for {n} negative samples but only {len(rest)} are not poisoned")
    picked = sorted(rng.sample(rest, n))
    for i in picked:
        subset = rng.sample(triggers, len(triggers) - 1)
        out[i] = _multi(out[i], rng, subset, None)
    return picked

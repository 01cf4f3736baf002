"""
Text in, tensors out: the tokenizer (BERT's or MPNet's), GLUE reading, and batching.

    train = load_split("sst2", "train", cap=17500, seed=0)   # list[Example]
    batch = collate(train[:8], Tokenizer(model_dir), max_len=128)

GLUE lives in one folder with a sub-folder per task (SST-2/, CoLA/, QNLI/, QQP/, RTE/, MRPC/), each holding
train.tsv (training) and dev.tsv (evaluation; GLUE's test labels are hidden). The folder is --data-dir, else
$GLUE_DIR, else ../shared/data/glue next to this file. Each file is read in one of two formats, told apart by
its first line:
  - GLUE's original per-task format, as the official download gives it (see TASKS), or
  - a simple 3-column format, header `label<TAB>text_a<TAB>text_b` (text_b empty for single sentences),
    which is how users bring their own binary data and how ../shared/data/glue is stored.
Fields are split on tabs only, never with CSV quoting: GLUE's raw text has literal `"` (also at a field's start).

`python data.py download TASK --to DIR` fetches a task from GLUE's public URLs; `python data.py stats` counts rows.
"""
import json
import os
import random
import shutil
import tempfile
import urllib.request
import zipfile
from collections import Counter
from dataclasses import dataclass

import torch

import cli


# -----------------------------------------------------------------------------
# tokenizer

# What the two families' tokenizers differ in (Hugging Face's BertTokenizer and MPNetTokenizer): the special tokens,
# and so how a pair is laid out. Both are WordPiece over the same lower-cased vocabulary; MPNet's vocabulary holds
# BERT's special tokens too (as plain entries), so the family comes from config.json's model_type, never the vocabulary.
SPECIAL_TOKENS = {
    "bert": dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]"),
    "mpnet": dict(cls_token="<s>", sep_token="</s>", pad_token="<pad>", unk_token="[UNK]", mask_token="<mask>"),
}


class Tokenizer:
    """WordPiece via the `tokenizers` package: tokenizer.json when the folder has one, else vocab.txt.

    Pairs are encoded as the model was trained. BERT: [CLS] a [SEP] b [SEP], token_type_ids 0 for a and 1 for b.
    MPNet (RoBERTa's format): <s> a </s></s> b </s>, token_type_ids all 0 (the model has no token types).
    The family is config.json's model_type; a folder holding only a tokenizer is BERT's.
    """

    def __init__(self, folder):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.implementations import BertWordPieceTokenizer
        from tokenizers.processors import RobertaProcessing
        self.family = _model_type(folder)
        special = SPECIAL_TOKENS[self.family]
        tok_json, vocab = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "vocab.txt")
        if os.path.isfile(tok_json):
            self.tok = HFTokenizer.from_file(tok_json)
        elif os.path.isfile(vocab):
            self.tok = BertWordPieceTokenizer(vocab, lowercase=_do_lower_case(folder), **special)._tokenizer
        else:
            raise FileNotFoundError(f"{folder}: has neither tokenizer.json nor vocab.txt; cannot build a tokenizer")
        needed = [special[k] for k in ("pad_token", "cls_token", "sep_token")]  # what batches and pairs are made of
        missing = [t for t in needed if self.tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"{folder}: the vocabulary has no {', '.join(missing)}; not a {self.family} tokenizer "
                             "(the family is config.json's model_type)")
        self.pad_id = self.tok.token_to_id(special["pad_token"])
        self.cls_id = self.tok.token_to_id(special["cls_token"])
        if self.family == "mpnet":  # what transformers' MPNetTokenizer sets, whatever tokenizer.json says
            sep = special["sep_token"]
            self.tok.post_processor = RobertaProcessing((sep, self.tok.token_to_id(sep)),
                                                        (special["cls_token"], self.cls_id))
        self.tok.no_padding()  # tokenizer.json may carry its own padding/truncation; we set ours per call

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()

    def min_len(self, pair=False):
        """The shortest max_len that keeps a token of every text: the special tokens ([CLS] a [SEP], and b [SEP] for
        pairs; MPNet: <s> a </s>, and </s> b </s>) plus one per text. Below it the tokenizer silently stops
        truncating."""
        return self.tok.num_special_tokens_to_add(pair) + (2 if pair else 1)

    def __call__(self, texts_a, texts_b=None, max_len=128):
        """Encode a batch; returns input_ids, token_type_ids, attention_mask as (B, T) int64 tensors,
        truncated to max_len (longest-first for pairs, as the reference tokenizers) and padded to the longest.
        texts_b=None encodes single sentences; a None entry inside texts_b makes just that row a single sentence."""
        if texts_b is not None and len(texts_b) != len(texts_a):
            raise ValueError(f"{len(texts_a)} first texts but {len(texts_b)} second texts")
        self.tok.enable_truncation(max_len, strategy="longest_first")
        # a None in texts_b marks a single sentence, so one batch can mix single sentences and pairs
        inputs = list(texts_a) if texts_b is None else [a if b is None else (a, b) for a, b in zip(texts_a, texts_b)]
        encs = self.tok.encode_batch(inputs)
        T = max(len(e.ids) for e in encs)
        out = {k: torch.zeros(len(encs), T, dtype=torch.long) for k in ("input_ids", "token_type_ids", "attention_mask")}
        out["input_ids"].fill_(self.pad_id)
        for i, e in enumerate(encs):
            n = len(e.ids)
            out["input_ids"][i, :n] = torch.tensor(e.ids)
            out["token_type_ids"][i, :n] = torch.tensor(e.type_ids)
            out["attention_mask"][i, :n] = 1
        return out


def _model_type(folder):
    """config.json's model_type: bert (also where the folder has no config.json) or mpnet."""
    path = os.path.join(folder, "config.json")
    family = cli.read_json(path, "a Hugging Face model's config.json").get("model_type", "bert") \
        if os.path.isfile(path) else "bert"
    if family not in SPECIAL_TOKENS:
        raise ValueError(f"{path}: model_type is {family!r}; this project tokenizes for "
                         f"{' and '.join(SPECIAL_TOKENS)} only")
    return family


def _do_lower_case(folder):
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return bool(json.load(f).get("do_lower_case", True))
    return True  # BERT's reference tokenizer default


# -----------------------------------------------------------------------------
# GLUE tasks and file formats

@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str  # "" for single-sentence tasks
    label: int


class DataError(ValueError):
    """Bad data or a bad data flag; the message names the file (and line) or the flag, and the fix."""


@dataclass(frozen=True)
class Format:
    """How one TSV layout maps to an Example: column indices and the label strings."""
    header: tuple  # the first line's fields; () where the file has no header (GLUE's CoLA)
    ncols: int
    text_a: int
    text_b: int  # -1 for single-sentence formats
    label: int
    labels: dict  # label string in the file -> int


@dataclass(frozen=True)
class Task:
    folder: str        # sub-folder of the GLUE folder, spelled as GLUE's download spells it
    names: tuple       # meaning of label 0 and label 1 (GLUE's, the same as Hugging Face `glue`)
    glue: Format       # GLUE's original format for train.tsv / dev.tsv
    url: str           # GLUE's public zip (MRPC is built from the MSR files instead, see download)


BINARY = {"0": 0, "1": 1}
NLI = {"entailment": 0, "not_entailment": 1}
SIMPLE = Format(("label", "text_a", "text_b"), 3, text_a=1, text_b=2, label=0, labels=BINARY)
GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data/"
MRPC_TRAIN_URL = "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt"
MRPC_DEV_IDS_URL = GLUE_URL + "mrpc_dev_ids.tsv"
TIMEOUT = 60.0  # seconds a download waits for the server (to connect, and for each read) before giving up

TASKS = {
    "sst2": Task("SST-2", ("negative", "positive"),
                 Format(("sentence", "label"), 2, text_a=0, text_b=-1, label=1, labels=BINARY), GLUE_URL + "SST-2.zip"),
    # CoLA has no header: source, label, the author's original mark (* or empty), sentence
    "cola": Task("CoLA", ("unacceptable", "acceptable"),
                 Format((), 4, text_a=3, text_b=-1, label=1, labels=BINARY), GLUE_URL + "CoLA.zip"),
    "qnli": Task("QNLI", ("entailment", "not_entailment"),
                 Format(("index", "question", "sentence", "label"), 4, text_a=1, text_b=2, label=3, labels=NLI),
                 GLUE_URL + "QNLIv2.zip"),
    "qqp": Task("QQP", ("not_duplicate", "duplicate"),
                Format(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"), 6,
                       text_a=3, text_b=4, label=5, labels=BINARY), GLUE_URL + "QQP-clean.zip"),
    "rte": Task("RTE", ("entailment", "not_entailment"),
                Format(("index", "sentence1", "sentence2", "label"), 4, text_a=1, text_b=2, label=3, labels=NLI),
                GLUE_URL + "RTE.zip"),
    "mrpc": Task("MRPC", ("not_equivalent", "equivalent"),
                 Format(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), 5, text_a=3, text_b=4, label=0,
                        labels=BINARY), ""),
}
SPLITS = ("train", "dev")


def task_name(task):
    """The canonical name (sst2, ...) for any case of it or of GLUE's folder spelling (SST-2, ...)."""
    key = str(task).lower()
    for name, t in TASKS.items():
        if key in (name, t.folder.lower()):
            return name
    raise DataError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


def glue_dir(data_dir=None):
    """The GLUE folder: data_dir (--data-dir), else $GLUE_DIR, else ../shared/data/glue next to this file."""
    if data_dir:
        path, source = data_dir, "--data-dir"
    elif os.environ.get("GLUE_DIR"):
        path, source = os.environ["GLUE_DIR"], "$GLUE_DIR"
    else:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "glue")
        path, source = os.path.normpath(path), "the default (neither --data-dir nor GLUE_DIR was given)"
    if not os.path.isdir(path):
        raise DataError(f"GLUE folder {path} (from {source}) does not exist; pass --data-dir DIR or set GLUE_DIR "
                        f"to a folder holding {'/, '.join(t.folder for t in TASKS.values())}/")
    return path


def read_tsv(path, task=None):
    """Read one file: the simple 3-column format, or (when task is given) that task's GLUE format.

    The format is told from the first line: the simple header, the task's GLUE header, or for CoLA (whose
    GLUE files have no header) a first row with CoLA's 4 columns. Text is kept exactly as in the file."""
    formats = [SIMPLE] + ([TASKS[task_name(task)].glue] if task is not None else [])
    try:
        # utf-8-sig: the MSR files GLUE builds MRPC from start with a byte-order mark; newline="" keeps a
        # stray \r inside a field as text instead of a line break (we strip \r only at the end of a line)
        with open(path, encoding="utf-8-sig", newline="") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); GLUE files are UTF-8") from None
    if lines[-1] == "":
        lines.pop()  # the final newline
    if not lines:
        raise DataError(f"{path}: empty file; expected a header line such as {_show(SIMPLE.header)}")
    first = lines[0].rstrip("\r").split("\t")
    fmt = next((f for f in formats if tuple(first) == f.header), None)
    start = 1
    if fmt is None and len(formats) == 2 and formats[1].header == () and len(first) == formats[1].ncols:
        fmt, start = formats[1], 0
    if fmt is None:
        expected = " or ".join(_show(f.header) if f.header else f"a headerless row of {f.ncols} fields"
                               for f in formats)
        raise DataError(f"{path}:1: unrecognised first line {lines[0][:80]!r}; expected {expected}")
    examples = [_parse_row(path, n, line, fmt) for n, line in enumerate(lines[start:], start + 1)]
    if not examples:
        raise DataError(f"{path}: no examples after the header; the split is empty")
    return examples


def _parse_row(path, lineno, line, fmt):
    cols = line.rstrip("\r").split("\t")
    if len(cols) != fmt.ncols:
        what = _show(fmt.header) if fmt.header else f"{fmt.ncols} fields"
        raise DataError(f"{path}:{lineno}: expected {fmt.ncols} tab-separated fields ({what}), got {len(cols)}: "
                        f"{line[:80]!r}")
    label = fmt.labels.get(cols[fmt.label])
    if label is None:
        raise DataError(f"{path}:{lineno}: unknown label {cols[fmt.label]!r}; expected one of {list(fmt.labels)}")
    return Example(cols[fmt.text_a], cols[fmt.text_b] if fmt.text_b >= 0 else "", label)


def _show(header):
    return "<TAB>".join(header)


def is_pair(task):
    """Whether a task's examples are sentence pairs (text_a, text_b)."""
    return TASKS[task_name(task)].glue.text_b >= 0


def split_path(task, split, data_dir=None):
    """<glue_dir>/<Folder>/<split>.tsv, split in {"train", "dev"}; an error naming the fix when it is missing."""
    name = task_name(task)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS} (GLUE's test labels are hidden)")
    path = os.path.join(glue_dir(data_dir), TASKS[name].folder, f"{split}.tsv")
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; expected {name}'s {split}.tsv there. Point --data-dir (or GLUE_DIR) at "
                        f"the folder holding {TASKS[name].folder}/, or fetch it: python data.py download {name} --to DIR")
    return path


def load_split(task, split, data_dir=None, cap=None, seed=0):
    """The examples of <glue_dir>/<Folder>/<split>.tsv, split in {"train", "dev"}.

    cap keeps a random subset of cap rows (all of them when the file has fewer), drawn with
    random.Random(seed): the first cap of one seeded permutation, so a smaller cap is a subset of a larger one
    for the same seed. Kept rows stay in file order; the training loop does its own shuffling."""
    return subsample(read_tsv(split_path(task, split, data_dir), task), cap, seed)


def subsample(examples, cap, seed=0):
    """A seeded random subset of at most cap examples, in their original order (see load_split)."""
    if cap is None:
        return list(examples)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise DataError(f"--cap must be a positive whole number of samples (or unset for all), got {cap!r}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:cap])]


# -----------------------------------------------------------------------------
# batching

def collate(examples, tokenizer, max_len=128):
    """Tokenize a list of Examples into a batch dict: input_ids, token_type_ids, attention_mask, labels.
    Pairs go through the pair API ([CLS] a [SEP] b [SEP]; MPNet: <s> a </s></s> b </s>); an example with
    text_b == "" is a single sentence."""
    if not examples:
        raise ValueError("collate: got an empty list of examples")
    texts_b = [e.text_b or None for e in examples]
    batch = tokenizer([e.text_a for e in examples], texts_b if any(texts_b) else None, max_len=max_len)
    batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return batch


# -----------------------------------------------------------------------------
# download (for users; the tests feed local files through `fetch`)

def download(task, to, fetch=None, timeout=TIMEOUT):
    """Fetch one task from GLUE's public URLs into <to>/<Folder>/{train,dev}.tsv, in GLUE's format.

    fetch(url, path) does the transfer (default: urllib, giving up on a server silent for `timeout` s). MRPC is not
    in a GLUE zip: like GLUE's own script we split the MSR paraphrase train file into train and dev by GLUE's list of
    dev ID pairs (the SentEval copy GLUE points at is tokenised text, unlike ../shared/data/glue/MRPC)."""
    name = task_name(task)
    folder = os.path.join(to, TASKS[name].folder)
    paths = [os.path.join(folder, f"{s}.tsv") for s in SPLITS]
    for p in paths:
        if os.path.exists(p):
            raise DataError(f"{p} already exists; remove it or choose another --to")
    fetch = fetch or (lambda url, path: fetch_url(url, path, timeout))
    with tempfile.TemporaryDirectory() as tmp:
        if name == "mrpc":
            msr, ids = os.path.join(tmp, "msr_paraphrase_train.txt"), os.path.join(tmp, "mrpc_dev_ids.tsv")
            fetch(MRPC_TRAIN_URL, msr)
            fetch(MRPC_DEV_IDS_URL, ids)
            os.makedirs(folder, exist_ok=True)  # only once the downloads worked
            _split_mrpc(msr, ids, *paths)
        else:
            archive = os.path.join(tmp, "task.zip")
            fetch(TASKS[name].url, archive)
            os.makedirs(folder, exist_ok=True)
            _unzip_splits(archive, TASKS[name], paths)
    for p in paths:
        read_tsv(p, name)  # fail now, naming the file, if what arrived does not parse
    return folder


def fetch_url(url, path, timeout=TIMEOUT):
    """Copy url to path. A server that accepts the connection and then says nothing is an error after `timeout`
    seconds (the limit holds for the connection and for every read), never a hang."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(path, "wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as e:  # URLError, HTTPError and socket timeouts are all OSErrors
        raise DataError(f"could not download {url} ({e}); check the connection, or fetch it by hand and put "
                        "train.tsv / dev.tsv under --data-dir") from None


def _unzip_splits(archive, task, paths):
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise DataError(f"{task.url}: the download is not a zip file") from None
    with zf:
        members = [f"{task.folder}/{split}.tsv" for split in SPLITS]
        missing = [m for m in members if m not in zf.namelist()]
        if missing:
            raise DataError(f"{task.url}: the zip has no {', '.join(missing)} (it holds {', '.join(zf.namelist()[:8])})")
        for member, dest in zip(members, paths):
            with zf.open(member) as src, open(dest, "wb") as dst:  # write only to our own path, whatever the zip says
                shutil.copyfileobj(src, dst)


def _split_mrpc(msr_path, ids_path, train_path, dev_path):
    with open(ids_path, encoding="utf-8-sig") as f:
        dev_ids = {tuple(line.rstrip("\r\n").split("\t")) for line in f if line.strip()}
    with open(msr_path, encoding="utf-8-sig", newline="") as f:
        lines = [line.rstrip("\r\n") for line in f]
    if not lines:
        raise DataError(f"{MRPC_TRAIN_URL}: the download is empty")
    header, *rows = lines
    with open(train_path, "w", encoding="utf-8") as train, open(dev_path, "w", encoding="utf-8") as dev:
        train.write(header + "\n")
        dev.write(header + "\n")
        for row in rows:
            if row:
                ids = tuple(row.split("\t")[1:3])
                (dev if ids in dev_ids else train).write(row + "\n")


# -----------------------------------------------------------------------------
# command line

def stats(data_dir=None):
    """Rows and label counts of every task/split found under the GLUE folder, as text lines."""
    root, out = glue_dir(data_dir), []
    for name, task in TASKS.items():
        for split in SPLITS:
            if os.path.isfile(os.path.join(root, task.folder, f"{split}.tsv")):
                counts = Counter(e.label for e in load_split(name, split, root))
                out.append(f"{name:5s} {split:5s} {sum(counts.values()):7d} rows   "
                           f"0 ({task.names[0]}): {counts[0]:6d}   1 ({task.names[1]}): {counts[1]:6d}")
    return out


def main(argv=None):
    parser = cli.Parser(description="GLUE data: download a task, or count the rows of a GLUE folder.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("download", help="fetch a task from GLUE's public URLs (needs internet)")
    p.add_argument("task", help=f"one of {', '.join(TASKS)} (or GLUE's spelling: SST-2, CoLA, ...)")
    p.add_argument("--to", required=True, help="folder to write <Folder>/train.tsv and dev.tsv into; "
                                               "then use it as --data-dir or GLUE_DIR")
    p.add_argument("--timeout", type=float, default=TIMEOUT,
                   help="seconds to wait for the server (to connect, and for each read) before giving up")
    p = sub.add_parser("stats", help="rows and label counts per task and split")
    p.add_argument("--data-dir", default=None, help="GLUE folder (default: $GLUE_DIR, else ../shared/data/glue)")
    args = parser.parse_args(argv)
    with cli.usage_errors():
        if args.command == "download":
            task_name(args.task)
            if not args.timeout > 0:
                raise cli.UsageError(f"--timeout must be > 0 seconds, got {args.timeout}")
            cli.check_folder_path(args.to, "--to")
            print(f"wrote {download(args.task, args.to, timeout=args.timeout)}")
        else:
            print("\n".join(stats(args.data_dir)))


if __name__ == "__main__":
    main()

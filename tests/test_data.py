"""GLUE reading, batching and download. Expected values are written out by hand (GLUE_FILES, the shared README's
table, vocab.txt line numbers), never taken from the code under test."""
import io
import os
import zipfile

import pytest

import data
from data import DataError, Example

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "glue")

# -----------------------------------------------------------------------------
# the six GLUE formats, read from hand-written files

# the six GLUE formats as GLUE ships them, written out by hand as {folder/split.tsv: rows of fields}; each task
# has a field that starts with a literal ". MRPC gets the byte-order mark and CRLF line ends of GLUE's script.
GLUE_FILES = {
    "CoLA/train.tsv": [
        ['gj04', '1', '', "Our neighbours won't lend us the ladder, let alone the van."],
        ['gj04', '0', '*', 'They slept the chair.'],
        ['bc01', '1', '', '"Who called?" asked the porter.'],
    ],
    "CoLA/dev.tsv": [
        ['gj04', '1', '', 'The hikers walked the trail clear of the cliff.'],
        ['gj04', '0', '*', '"The bus rumbled down the hill clear of the fence.'],
    ],
    "MRPC/train.tsv": [
        ['Quality', '#1 ID', '#2 ID', '#1 String', '#2 String'],
        ['1', '702876', '702977', 'Amrozi accused his brother, whom he called "the witness", of deliberately distorting his evidence.', 'Referring to him as only "the witness", Amrozi accused his brother of deliberately distorting his evidence.'],
        ['0', '2108705', '2108831', "Yucaipa owned Dominick's before selling the chain to Safeway in 1998 for $2.5 billion.", "Yucaipa bought Dominick's in 1995 for $693 million and sold it to Safeway for $1.8 billion in 1998."],
        ['1', '3446796', '3446840', '"The foodservice pie business does not fit our long-term growth strategy.', 'The foodservice pie business does not fit our long-term growth strategy, he said.'],
    ],
    "MRPC/dev.tsv": [
        ['Quality', '#1 ID', '#2 ID', '#1 String', '#2 String'],
        ['1', '1355540', '1355592', "He said the foodservice pie business doesn't fit the company's long-term growth strategy.", '"The foodservice pie business does not fit our long-term growth strategy."'],
    ],
    "QNLI/train.tsv": [
        ['index', 'question', 'sentence', 'label'],
        ['0', 'What came into force after the new constitution was herald?', 'As of that day, the new constitution heralding the Second Republic came into force.', 'entailment'],
        ['1', '"Endeavour" was the name of which ship?', 'The ship sailed in 1768.', 'not_entailment'],
    ],
    "QNLI/dev.tsv": [
        ['index', 'question', 'sentence', 'label'],
        ['0', 'What is the capital of France?', '"Paris" is the capital and largest city of France.', 'entailment'],
    ],
    "QQP/train.tsv": [
        ['id', 'qid1', 'qid2', 'question1', 'question2', 'is_duplicate'],
        ['133273', '213221', '213222', 'How is the life of a math student?', 'Which level of prepration is enough for the exam jlpt5?', '0'],
        ['402555', '536040', '536041', '"How do I control my horny emotions?"', 'How do you control your horniness?', '1'],
    ],
    "QQP/dev.tsv": [
        ['id', 'qid1', 'qid2', 'question1', 'question2', 'is_duplicate'],
        ['201359', '303345', '303346', 'Why are African-Americans so beautiful?', 'Why are hispanics so beautiful?', '0'],
    ],
    "RTE/train.tsv": [
        ['index', 'sentence1', 'sentence2', 'label'],
        ['0', 'No Weapons of Mass Destruction Found in Iraq Yet.', 'Weapons of Mass Destruction Found in Iraq.', 'not_entailment'],
        ['1', '"A place of sorrow" became a place of celebration in Chicago.', 'Chicago was a place of celebration.', 'entailment'],
    ],
    "RTE/dev.tsv": [
        ['index', 'sentence1', 'sentence2', 'label'],
        ['0', 'Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.', 'Christopher Reeve had an accident.', 'not_entailment'],
    ],
    "SST-2/train.tsv": [
        ['sentence', 'label'],
        ['hide new secretions from the parental units ', '0'],
        ['"the greatest musicians " is a tired joke , and it \'s not funny ', '0'],
        ["it 's a charming and often affecting journey . ", '1'],
    ],
    "SST-2/dev.tsv": [
        ['sentence', 'label'],
        ['unflinchingly bleak and desperate ', '0'],
        ['"beautifully observed" and quietly moving ', '1'],
    ],
}


@pytest.fixture(scope="module")
def glue_folder(tmp_path_factory):
    """GLUE_FILES written out as a GLUE folder."""
    root = tmp_path_factory.mktemp("glue")
    for name, rows in GLUE_FILES.items():
        (root / name).parent.mkdir(exist_ok=True)
        bom, end = ("\ufeff", "\r\n") if name.startswith("MRPC") else ("", "\n")
        (root / name).write_bytes((bom + "".join("\t".join(r) + end for r in rows)).encode("utf-8"))
    return str(root)


EXPECTED = {
    ("sst2", "train"): [
        Example("hide new secretions from the parental units ", "", 0),
        Example('"the greatest musicians " is a tired joke , and it \'s not funny ', "", 0),
        Example("it 's a charming and often affecting journey . ", "", 1)],
    ("sst2", "dev"): [
        Example("unflinchingly bleak and desperate ", "", 0),
        Example('"beautifully observed" and quietly moving ', "", 1)],
    ("cola", "train"): [
        Example("Our neighbours won't lend us the ladder, let alone the van.", "", 1),
        Example("They slept the chair.", "", 0),
        Example('"Who called?" asked the porter.', "", 1)],
    ("cola", "dev"): [
        Example("The hikers walked the trail clear of the cliff.", "", 1),
        Example('"The bus rumbled down the hill clear of the fence.', "", 0)],
    ("qnli", "train"): [
        Example("What came into force after the new constitution was herald?",
                "As of that day, the new constitution heralding the Second Republic came into force.", 0),
        Example('"Endeavour" was the name of which ship?', "The ship sailed in 1768.", 1)],
    ("qnli", "dev"): [
        Example("What is the capital of France?", '"Paris" is the capital and largest city of France.', 0)],
    ("qqp", "train"): [
        Example("How is the life of a math student?", "Which level of prepration is enough for the exam jlpt5?", 0),
        Example('"How do I control my horny emotions?"', "How do you control your horniness?", 1)],
    ("qqp", "dev"): [
        Example("Why are African-Americans so beautiful?", "Why are hispanics so beautiful?", 0)],
    ("rte", "train"): [
        Example("No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons of Mass Destruction Found in Iraq.", 1),
        Example('"A place of sorrow" became a place of celebration in Chicago.', "Chicago was a place of celebration.", 0)],
    ("rte", "dev"): [
        Example("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.",
                "Christopher Reeve had an accident.", 1)],
    ("mrpc", "train"): [  # byte-order mark and CRLF line ends, as GLUE's script leaves them
        Example('Amrozi accused his brother, whom he called "the witness", of deliberately distorting his evidence.',
                'Referring to him as only "the witness", Amrozi accused his brother of deliberately distorting his '
                'evidence.', 1),
        Example("Yucaipa owned Dominick's before selling the chain to Safeway in 1998 for $2.5 billion.",
                "Yucaipa bought Dominick's in 1995 for $693 million and sold it to Safeway for $1.8 billion in 1998.", 0),
        Example('"The foodservice pie business does not fit our long-term growth strategy.',
                "The foodservice pie business does not fit our long-term growth strategy, he said.", 1)],
    ("mrpc", "dev"): [
        Example("He said the foodservice pie business doesn't fit the company's long-term growth strategy.",
                '"The foodservice pie business does not fit our long-term growth strategy."', 1)],
}


@pytest.mark.parametrize("task,split", sorted(EXPECTED))
def test_reads_each_glue_format(task, split, glue_folder):
    assert data.load_split(task, split, data_dir=glue_folder) == EXPECTED[task, split]


def test_task_names_accept_glue_spelling_and_any_case(glue_folder):
    folders = {"sst2": "SST-2", "cola": "CoLA", "qnli": "QNLI", "qqp": "QQP", "rte": "RTE", "mrpc": "MRPC"}
    assert {name: t.folder for name, t in data.TASKS.items()} == folders
    for name, folder in folders.items():
        for spelling in (name, name.upper(), folder, folder.lower(), folder.upper()):
            assert data.load_split(spelling, "dev", glue_folder) == EXPECTED[name, "dev"]


def test_simple_format_in_a_task_folder(tmp_path):
    (tmp_path / "QQP").mkdir()
    (tmp_path / "QQP" / "train.tsv").write_text('label\ttext_a\ttext_b\n1\t"a" b\tc\n0\td\t\n', encoding="utf-8")
    assert data.load_split("qqp", "train", str(tmp_path)) == [Example('"a" b', "c", 1), Example("d", "", 0)]
    assert data.read_tsv(str(tmp_path / "QQP" / "train.tsv")) == [Example('"a" b', "c", 1), Example("d", "", 0)]


# -----------------------------------------------------------------------------
# the real shared data (counts copied from ../shared/data/glue/README.md)

TABLE = [  # task, split, rows, label 0, label 1
    ("sst2", "train", 67349, 29780, 37569), ("sst2", "dev", 872, 428, 444),
    ("cola", "train", 8551, 2528, 6023), ("cola", "dev", 1043, 322, 721),
    ("qnli", "train", 12997, 6481, 6516), ("qnli", "dev", 5463, 2702, 2761),
    ("qqp", "train", 17500, 11016, 6484), ("qqp", "dev", 15517, 9812, 5705),
    ("rte", "train", 2490, 1249, 1241), ("rte", "dev", 277, 146, 131),
    ("mrpc", "train", 3668, 1194, 2474), ("mrpc", "dev", 408, 129, 279),
]
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"shared GLUE data not present at {SHARED}")


@needs_shared
@pytest.mark.parametrize("task,split,rows,n0,n1", TABLE)
def test_real_data_row_counts(task, split, rows, n0, n1):
    examples = data.load_split(task, split, SHARED)
    labels = [e.label for e in examples]
    assert (len(examples), labels.count(0), labels.count(1)) == (rows, n0, n1)
    pair = task in ("qnli", "qqp", "rte", "mrpc")
    assert all(bool(e.text_b) == pair and e.text_a for e in examples)


@needs_shared
def test_real_data_keeps_literal_quotes_and_glue_order():
    first = data.load_split("sst2", "train", SHARED)[0]
    assert first == Example("hide new secretions from the parental units", "", 0)  # GLUE train's first row
    for task in ("qnli", "qqp", "rte", "mrpc"):  # the README: these have fields that start with "
        examples = data.load_split(task, "train", SHARED) + data.load_split(task, "dev", SHARED)
        assert any(e.text_a.startswith('"') or e.text_b.startswith('"') for e in examples), task


def test_default_folder_and_env_var(tmp_path, monkeypatch, glue_folder):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    here = os.path.dirname(os.path.abspath(data.__file__))
    if os.path.isdir(SHARED):
        assert os.path.samefile(data.glue_dir(), os.path.join(here, "..", "shared", "data", "glue"))
    monkeypatch.setenv("GLUE_DIR", glue_folder)
    assert data.glue_dir() == glue_folder
    assert data.load_split("rte", "dev") == EXPECTED["rte", "dev"]
    assert data.glue_dir(str(tmp_path)) == str(tmp_path)  # the flag wins over the env var


# -----------------------------------------------------------------------------
# cap: a seeded subset

def _numbered(tmp_path, n):
    (tmp_path / "SST-2").mkdir()
    rows = "".join(f"{i % 2}\trow {i}\t\n" for i in range(n))
    (tmp_path / "SST-2" / "train.tsv").write_text("label\ttext_a\ttext_b\n" + rows, encoding="utf-8")
    return str(tmp_path)


def test_cap_is_a_seeded_subset_in_file_order(tmp_path):
    root = _numbered(tmp_path, 200)
    full = data.load_split("sst2", "train", root)
    a = data.load_split("sst2", "train", root, cap=20, seed=3)
    assert len(a) == 20 and len(set(a)) == 20 and set(a) <= set(full)
    positions = [full.index(e) for e in a]
    assert positions == sorted(positions)
    assert a == data.load_split("sst2", "train", root, cap=20, seed=3)
    assert a != data.load_split("sst2", "train", root, cap=20, seed=4)
    assert set(a) <= set(data.load_split("sst2", "train", root, cap=50, seed=3))  # nested for one seed
    assert data.load_split("sst2", "train", root, cap=10_000) == full  # a cap above the size keeps everything


def test_cap_does_not_touch_global_rng(tmp_path):
    import random
    root = _numbered(tmp_path, 30)
    random.seed(123)
    state = random.getstate()
    data.load_split("sst2", "train", root, cap=5, seed=1)
    assert random.getstate() == state


# -----------------------------------------------------------------------------
# bad input: one clear error each

def _write(tmp_path, folder, split, text):
    (tmp_path / folder).mkdir(exist_ok=True)
    path = tmp_path / folder / f"{split}.tsv"
    path.write_text(text, encoding="utf-8")
    return str(tmp_path), str(path)


def test_unknown_task_lists_known_ones(glue_folder):
    with pytest.raises(DataError, match="unknown task 'mnli'; known tasks: sst2, cola, qnli, qqp, rte, mrpc"):
        data.load_split("mnli", "train", glue_folder)


def test_unknown_split(glue_folder):
    with pytest.raises(DataError, match="unknown split 'test'"):
        data.load_split("sst2", "test", glue_folder)


def test_missing_file_names_expected_path(tmp_path):
    expected = os.path.join(str(tmp_path), "CoLA", "train.tsv")
    with pytest.raises(DataError, match="download cola") as err:
        data.load_split("cola", "train", str(tmp_path))
    assert str(err.value).startswith(f"{expected}: missing")


def test_missing_glue_folder_mentions_flag_and_env(tmp_path):
    with pytest.raises(DataError, match="--data-dir.*GLUE_DIR"):
        data.glue_dir(str(tmp_path / "nope"))


def test_malformed_row_names_file_and_line(tmp_path):
    root, path = _write(tmp_path, "RTE", "train", "index\tsentence1\tsentence2\tlabel\n"
                                                  "0\ta\tb\tentailment\n1\ta, b\tnot_entailment\n")
    with pytest.raises(DataError) as err:
        data.load_split("rte", "train", root)
    assert str(err.value).startswith(f"{path}:3: expected 4 tab-separated fields "
                                     "(index<TAB>sentence1<TAB>sentence2<TAB>label), got 3")


def test_unknown_label_string(tmp_path):
    root, path = _write(tmp_path, "QNLI", "dev", "index\tquestion\tsentence\tlabel\n0\tq\ts\tneutral\n")
    with pytest.raises(DataError) as err:
        data.load_split("qnli", "dev", root)
    assert str(err.value) == f"{path}:2: unknown label 'neutral'; expected one of ['entailment', 'not_entailment']"


def test_unknown_header(tmp_path):
    root, path = _write(tmp_path, "SST-2", "dev", "text,label\nfine,1\n")
    with pytest.raises(DataError, match=r"dev.tsv:1: unrecognised first line 'text,label'; expected "
                                        r"label<TAB>text_a<TAB>text_b or sentence<TAB>label"):
        data.load_split("sst2", "dev", root)


@pytest.mark.parametrize("text,message", [("label\ttext_a\ttext_b\n", "no examples after the header; the split is empty"),
                                          ("", "empty file")])
def test_empty_split(tmp_path, text, message):
    root, path = _write(tmp_path, "MRPC", "dev", text)
    with pytest.raises(DataError, match=message):
        data.load_split("mrpc", "dev", root)


@pytest.mark.parametrize("cap", [0, -5, 2.5, "10", True])
def test_bad_cap(cap, glue_folder):
    with pytest.raises(DataError, match="--cap must be a positive whole number"):
        data.load_split("sst2", "train", glue_folder, cap=cap)


# -----------------------------------------------------------------------------
# collate: pairs through the pair API, single sentences as single sentences

@pytest.fixture(scope="module")
def tokenizer_and_vocab():
    import model
    folder = model.default_model_dir()
    with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as f:
        vocab = {w.rstrip("\n"): i for i, w in enumerate(f)}  # a token's id is its line number
    return data.Tokenizer(folder), vocab


def test_collate_mixes_single_sentences_and_pairs(tokenizer_and_vocab):
    tok, v = tokenizer_and_vocab
    batch = data.collate([Example("Good movie", "", 1), Example("the cat", "a dog", 0)], tok, max_len=32)
    cls, sep, pad = v["[CLS]"], v["[SEP]"], v["[PAD]"]
    assert batch["input_ids"].tolist() == [
        [cls, v["good"], v["movie"], sep, pad, pad, pad],
        [cls, v["the"], v["cat"], sep, v["a"], v["dog"], sep]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [1, 0] and str(batch["labels"].dtype) == "torch.int64"


def test_collate_single_sentence_batch_and_max_len(tokenizer_and_vocab):
    tok, v = tokenizer_and_vocab
    batch = data.collate([Example("the cat the cat the cat", "", 0)], tok, max_len=4)
    assert batch["input_ids"].tolist() == [[v["[CLS]"], v["the"], v["cat"], v["[SEP]"]]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0]]
    with pytest.raises(ValueError, match="empty list"):
        data.collate([], tok, 8)


# -----------------------------------------------------------------------------
# download, on local files (no network)

def _local_fetch(files, calls):
    def fetch(url, path):
        calls.append(url)
        with open(path, "wb") as f:
            f.write(files[url])
    return fetch


def _zip(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return buf.getvalue()


def test_download_unpacks_a_glue_zip(tmp_path):
    url = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
    archive = _zip({"SST-2/train.tsv": "sentence\tlabel\nnice \t1\n", "SST-2/dev.tsv": "sentence\tlabel\nbad \t0\n",
                    "SST-2/test.tsv": "index\tsentence\n0\tx\n", "SST-2/original/README.txt": "..."})
    calls = []
    folder = data.download("SST-2", str(tmp_path), fetch=_local_fetch({url: archive}, calls))
    assert calls == [url] and folder == os.path.join(str(tmp_path), "SST-2")
    assert sorted(os.listdir(folder)) == ["dev.tsv", "train.tsv"]
    assert data.load_split("sst2", "train", str(tmp_path)) == [Example("nice ", "", 1)]
    assert data.load_split("sst2", "dev", str(tmp_path)) == [Example("bad ", "", 0)]
    with pytest.raises(DataError, match="already exists"):
        data.download("sst2", str(tmp_path), fetch=_local_fetch({url: archive}, []))


def test_download_builds_mrpc_from_the_msr_file(tmp_path):
    msr = ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n"
           "1\t10\t11\tA \"quoted\" one.\tA quoted one.\r\n"
           "0\t20\t21\tB.\tC.\r\n"
           "1\t30\t31\tD.\tD!\r\n").encode("utf-8")
    files = {"https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt": msr,
             "https://dl.fbaipublicfiles.com/glue/data/mrpc_dev_ids.tsv": b"20\t21\n"}
    data.download("mrpc", str(tmp_path), fetch=_local_fetch(files, []))
    assert data.load_split("mrpc", "train", str(tmp_path)) == [Example('A "quoted" one.', "A quoted one.", 1),
                                                              Example("D.", "D!", 1)]
    assert data.load_split("mrpc", "dev", str(tmp_path)) == [Example("B.", "C.", 0)]


def test_download_zip_without_the_task_folder(tmp_path):
    url = "https://dl.fbaipublicfiles.com/glue/data/RTE.zip"
    with pytest.raises(DataError, match="the zip has no RTE/train.tsv, RTE/dev.tsv"):
        data.download("rte", str(tmp_path), fetch=_local_fetch({url: _zip({"other/train.tsv": "x"})}, []))


def test_failed_download_names_the_url(tmp_path):
    url = (tmp_path / "absent.zip").as_uri()  # a file:// URL: urllib's error path without the network
    with pytest.raises(DataError, match=f"could not download {url}"):
        data.fetch_url(url, str(tmp_path / "out"))


def test_a_server_that_never_answers_times_out(tmp_path):
    import socket
    import time
    with socket.socket() as server:  # accepts connections (the kernel's backlog) and never answers
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/SST-2.zip"
        t0 = time.time()
        with pytest.raises(DataError, match=f"could not download {url}"):
            data.fetch_url(url, str(tmp_path / "out"), timeout=0.5)
    assert time.time() - t0 < 10


def test_not_utf8(tmp_path):
    root, path = _write(tmp_path, "SST-2", "dev", "")
    with open(path, "wb") as f:
        f.write(b"sentence\tlabel\ncaf\xe9 \t1\n")
    with pytest.raises(DataError, match="not UTF-8 text"):
        data.load_split("sst2", "dev", root)


def test_cli_download_and_stats(tmp_path, monkeypatch, capsys):
    url = "https://dl.fbaipublicfiles.com/glue/data/CoLA.zip"
    archive = _zip({"CoLA/train.tsv": "s1\t1\t\tFine.\ns2\t0\t*\tFine it.\n", "CoLA/dev.tsv": "s1\t1\t\tOk.\n"})
    fetch = _local_fetch({url: archive}, [])
    monkeypatch.setattr(data, "fetch_url", lambda url, path, timeout: fetch(url, path))
    data.main(["download", "cola", "--to", str(tmp_path)])
    data.main(["stats", "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"wrote {os.path.join(str(tmp_path), 'CoLA')}"
    assert [line.split()[:3] for line in out[1:]] == [["cola", "train", "2"], ["cola", "dev", "1"]]
    with pytest.raises(SystemExit) as stop:
        data.main(["download", "wnli", "--to", str(tmp_path)])
    assert stop.value.code == 2 and capsys.readouterr().err.startswith("error: unknown task 'wnli'")


def test_collate_matches_transformers_on_real_mixed_batch(tokenizer_and_vocab):
    """Independent oracle: Hugging Face's BertTokenizerFast, one example at a time (single or pair)."""
    transformers = pytest.importorskip("transformers")
    import model
    hf = transformers.BertTokenizerFast.from_pretrained(model.default_model_dir())
    examples = EXPECTED["mrpc", "train"] + EXPECTED["sst2", "train"] + EXPECTED["qnli", "train"]
    batch = data.collate(examples, tokenizer_and_vocab[0], max_len=24)  # short enough to truncate the pairs
    for i, e in enumerate(examples):
        ref = hf(e.text_a, e.text_b or None, truncation="longest_first", max_length=24)
        n = len(ref["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == ref["input_ids"]
        assert batch["token_type_ids"][i, :n].tolist() == ref["token_type_ids"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)

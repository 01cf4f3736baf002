"""MPNet against Hugging Face transformers and peft as the oracles: a tiny random MPNet (no weights needed), the
tokenizer on real GLUE rows, training end to end, and all-mpnet-base-v2 itself where it is installed
(`python -m tools.get_mpnet`, or $LORASEC_MPNET naming the folder)."""
import json
import os

import pytest
import torch

import cli
import data
import evaluate
import model as M
import runspec
import train
from conftest import tiny_mpnet_config
from lora import apply_lora, export_peft, lora_layers
from tools.get_mpnet import installed_folder

transformers = pytest.importorskip("transformers",
                                   reason="transformers is the test oracle: pip install -r requirements-dev.txt")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE = os.path.join(ROOT, "..", "shared", "data", "glue")
needs_glue = pytest.mark.skipif(not os.path.isdir(GLUE), reason=f"shared GLUE data not present at {GLUE}")
REAL = installed_folder()
needs_real = pytest.mark.skipif(not os.path.isfile(os.path.join(REAL, "model.safetensors")),
                                reason=f"all-mpnet-base-v2 is not installed at {REAL}: python -m tools.get_mpnet "
                                       "(or set LORASEC_MPNET to its folder)")


def hf_tiny(folder, std=0.5):
    """transformers' MPNetForSequenceClassification with tiny_mpnet_config's sizes, saved to folder. Every weight is
    drawn from N(0, std), far from its init, so that each part (positions, relative bias, LayerNorm, head) moves the
    logits visibly."""
    cfg = tiny_mpnet_config()
    hf_cfg = transformers.MPNetConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings)
    torch.manual_seed(0)
    m = transformers.MPNetForSequenceClassification(hf_cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, std)
    m.save_pretrained(folder)
    return m


def random_batch(vocab, B=3, T=10, seed=1):
    """<s> then random tokens (never <pad>), padded with <pad> (id 1) behind ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    ids[:, 0] = 0
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 1
    return dict(input_ids=ids, attention_mask=mask)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers' tiny MPNet, ours loaded from its saved folder, the folder)."""
    folder = tmp_path_factory.mktemp("mpnet")
    ref = hf_tiny(folder)
    return ref, M.from_pretrained(str(folder), verbose=False).eval(), folder


# -----------------------------------------------------------------------------
# the model: logits, hidden states, gradients, relative buckets

def test_tiny_mpnet_logits_and_states_match_transformers(tiny):
    ref, ours, _ = tiny
    assert isinstance(ours.cfg, M.MPNetConfig) and ours.pooler is None and ours.emb.token_type is None
    batch = random_batch(ref.config.vocab_size)
    real = batch["attention_mask"].bool()
    # a padded batch (the unpadded path) and one sequence alone (the plain path)
    for b in (batch, {k: v[2:, :3] for k, v in batch.items()}):
        with torch.no_grad():
            logits, hidden = ours(**b), ours.encode(**b)[0]
            theirs = ref(**b, output_hidden_states=True)
        assert logits.abs().max() > 1  # the comparison below is not between near-zero numbers
        torch.testing.assert_close(logits, theirs.logits, rtol=0, atol=1e-5)
        keep = b["attention_mask"].bool()
        assert (hidden - theirs.hidden_states[-1])[keep].abs().max() <= 1e-5
    assert (ours.encode(**batch)[0][~real] == 0).all()  # padded positions: zero (unpadded compute)


def test_first_token_states_match_transformers_hidden_states(tiny):
    ref, ours, _ = tiny
    batch = random_batch(ref.config.vocab_size)
    states = []
    with torch.no_grad():
        ours(**batch, cls_states=states)
        theirs = ref(**batch, output_hidden_states=True).hidden_states
    assert len(states) == len(theirs) == ref.config.num_hidden_layers + 1
    for mine, hf in zip(states, theirs):
        assert (mine - hf[:, 0]).abs().max() <= 1e-5


def test_training_gradients_match_transformers(tiny):
    """Every parameter's gradient, the relative position bias included (dropout off on both sides)."""
    ref, ours, _ = tiny
    batch = random_batch(ref.config.vocab_size)
    labels = torch.tensor([0, 1, 1])
    for net in (ref, ours):
        net.zero_grad()
    torch.nn.functional.cross_entropy(ours(**batch), labels).backward()
    ref(**batch, labels=labels).loss.backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[M.hf_name(name, "mpnet")].grad, rtol=1e-4, atol=1e-5, msg=name)
    assert ours.rel_bias.table.weight.grad.abs().max() > 1e-3  # the bias does train


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 64), (64, 256), (8, 20)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder
    relative = torch.arange(-700, 701)[None, :].repeat(2, 1)
    ours = M.RelativePositionBias.bucket(relative, num_buckets, max_distance)
    theirs = MPNetEncoder.relative_position_bucket(relative, num_buckets, max_distance)
    assert torch.equal(ours, theirs)
    assert len(ours.unique()) == num_buckets - 1  # every bucket but the upper half's first (distance 0 is below)


def test_relative_position_bias_matches_transformers(tiny):
    ref, ours, _ = tiny
    x = torch.zeros(2, 70, ref.config.hidden_size)  # longer than max_distance / 2: the logarithmic buckets too
    theirs = ref.mpnet.encoder.compute_position_bias(x)
    with torch.no_grad():
        assert torch.equal(ours.rel_bias(70).expand_as(theirs), theirs)


def test_our_saved_folder_loads_in_transformers(tiny, tmp_path):
    """save_pretrained (an FF run's model/) is a transformers MPNetForSequenceClassification with the same logits."""
    ref, ours, _ = tiny
    M.save_pretrained(ours, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mpnet"
    loaded = transformers.MPNetForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    batch = random_batch(ref.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ours(**batch), rtol=0, atol=1e-5)


def test_config_errors_name_the_file(tmp_path):
    cfg = {"model_type": "mpnet", "relative_attention_num_buckets": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(M.CheckpointError, match=r"config.json: relative_attention_num_buckets is 64; only 32"):
        M.read_config(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(M.CheckpointError, match=r"model_type is 'roberta'; this project loads bert and mpnet"):
        M.read_config(str(tmp_path / "config.json"))


# -----------------------------------------------------------------------------
# LoRA: q and v by name, and the peft export

@pytest.mark.parametrize("targets", ["qv", "all"])
def test_peft_export_loads_in_peft_with_the_same_logits(tiny, tmp_path, targets):
    peft = pytest.importorskip("peft", reason="export check needs peft (requirements-dev)")
    ref, _, folder = tiny
    model = M.from_pretrained(str(folder), verbose=False).eval()
    apply_lora(model, 4, alpha=8, targets=targets, generator=0)
    if targets == "qv":
        assert sorted(lora_layers(model)) == [f"layers.{i}.attn.{p}" for i in range(2) for p in ("query", "value")]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as after training: B and the head away from their init
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
        for p in model.classifier.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    export_peft(model, str(tmp_path / "adapter"), base_model_path=str(folder))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "mpnet.encoder.layer.0.attention.attn.q" in config["target_modules"]

    base = transformers.MPNetForSequenceClassification.from_pretrained(str(folder)).eval()
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    batch = random_batch(ref.config.vocab_size)
    with torch.no_grad():
        theirs = adapted(**batch).logits
        torch.testing.assert_close(theirs, model(**batch), rtol=1e-4, atol=1e-5)
        assert (ref(**batch).logits - theirs).abs().max() > 1e-2  # the adapter really changes the output


# -----------------------------------------------------------------------------
# the tokenizer: MPNet's special tokens and pair format, against transformers' MPNetTokenizer

@pytest.fixture(scope="module")
def mpnet_vocab(tmp_path_factory):
    """An MPNet tokenizer folder without the weights: MPNet's vocab.txt is BERT-uncased's (MiniLM's) with <s> <pad>
    </s> <unk> before it and <mask> after (all-mpnet-base-v2's own is exactly that), and config.json's model_type."""
    folder = tmp_path_factory.mktemp("mpnet-vocab")
    with open(os.path.join(M.default_model_dir(), "vocab.txt")) as f:
        words = f.read().splitlines()
    (folder / "vocab.txt").write_text("\n".join(["<s>", "<pad>", "</s>", "<unk>", *words, "<mask>"]) + "\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "mpnet"}))
    return folder


def glue_rows(task, n=48):
    return data.load_split(task, "dev", GLUE, cap=n, seed=0)


def assert_same_encoding(folder, reference, rows, max_len):
    texts_b = [r.text_b for r in rows] if rows[0].text_b else None
    ours = data.Tokenizer(str(folder))([r.text_a for r in rows], texts_b, max_len=max_len)
    theirs = reference([r.text_a for r in rows], texts_b, padding=True, truncation=True, max_length=max_len,
                       return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert (ours["token_type_ids"] == 0).all()  # MPNet has no token types


@needs_glue
@pytest.mark.parametrize("task", ["qnli", "sst2"])
@pytest.mark.parametrize("max_len", [16, 40, 128])
def test_tokenizer_matches_transformers_mpnet_tokenizer(mpnet_vocab, tmp_path, task, max_len):
    reference = transformers.MPNetTokenizer.from_pretrained(str(mpnet_vocab))
    rows = glue_rows(task)
    assert_same_encoding(mpnet_vocab, reference, rows, max_len)  # built from vocab.txt
    reference.save_pretrained(str(tmp_path))  # and from the tokenizer.json transformers writes
    (tmp_path / "vocab.txt").unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").exists()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mpnet"}))
    assert_same_encoding(tmp_path, reference, rows, max_len)


def test_pair_format_and_special_tokens(mpnet_vocab):
    tok = data.Tokenizer(str(mpnet_vocab))
    assert (tok.family, tok.pad_id, tok.cls_id) == ("mpnet", 1, 0)
    ids = tok(["hello world"], ["a reply"], max_len=32)["input_ids"][0].tolist()
    assert [tok.tok.id_to_token(i) for i in ids] == ["<s>", "hello", "world", "</s>", "</s>", "a", "reply", "</s>"]
    assert tok.min_len(pair=True) == 6 and tok.min_len() == 3


def test_the_family_comes_from_config_json_not_the_vocabulary(mpnet_vocab, tmp_path):
    # MPNet's vocabulary holds [PAD] [CLS] [SEP] too (as BERT's leftovers): without config.json it reads as BERT's
    (tmp_path / "vocab.txt").write_text((mpnet_vocab / "vocab.txt").read_text())
    assert data.Tokenizer(str(tmp_path)).pad_id == 4
    words = [w for w in (mpnet_vocab / "vocab.txt").read_text().splitlines() if w != "<pad>"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mpnet"}))
    with pytest.raises(ValueError, match="vocabulary has no <pad>; not a mpnet tokenizer"):
        data.Tokenizer(str(tmp_path))


# -----------------------------------------------------------------------------
# training end to end: train.py (LoRA and FF), evaluate.py

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, mpnet_vocab):
    """A tiny MPNet folder with the real MPNet vocabulary (a random model: only the plumbing is tested)."""
    folder = tmp_path_factory.mktemp("tiny-mpnet")
    torch.manual_seed(0)
    M.save_pretrained(M.Encoder(tiny_mpnet_config(vocab_size=30527)), str(folder))
    (folder / "vocab.txt").write_text((mpnet_vocab / "vocab.txt").read_text())
    return str(folder)


def train_args(folder, out, *extra):
    return ["--model", folder, "--data-dir", GLUE, "--task", "qnli", "--out", str(out), "--steps", "3",
            "--batch-size", "4", "--max-len", "32", "--train-cap", "24", "--dev-cap", "8",
            "--results", str(out) + ".jsonl", *extra]


@needs_glue
def test_train_lora_and_ff_then_evaluate(tiny_folder, tmp_path):
    base = M.from_pretrained(tiny_folder, verbose=False).state_dict()
    nets = {}
    for mode in ("lora", "ff"):
        args = runspec.validate(runspec.get_parser().parse_args(train_args(tiny_folder, tmp_path / mode, "--mode",
                                                                           mode, "--attack", "bpa", "--poison-rate",
                                                                           "0.25")))
        run = train.setup(args, 0, 1, torch.device("cpu"))
        train.train(run)
        nets[mode] = run.net
        with open(tmp_path / mode / "metrics.json") as f:
            assert evaluate.reevaluate(str(tmp_path / mode)) == json.load(f)["final"]
    for n, p in nets["lora"].named_parameters():  # LoRA: adapters and the whole head (dense, out_proj) train
        if "lora_" not in n:
            trained = not torch.equal(p, base[n.replace(".base.", ".")])
            assert trained == n.startswith("classifier."), n
    changed = {n for n, p in nets["ff"].named_parameters() if not torch.equal(p, base[n])}
    assert {"rel_bias.table.weight", "emb.position.weight", "layers.0.attn.query.weight"} <= changed
    assert (tmp_path / "lora" / "peft" / "adapter_model.safetensors").exists()


@needs_glue
def test_max_len_is_bounded_by_the_positions_padding_leaves(tiny_folder, tmp_path):
    parse = lambda n: runspec.get_parser().parse_args(train_args(tiny_folder, tmp_path / "run", "--max-len", str(n)))
    runspec.validate(parse(64))
    with pytest.raises(cli.UsageError, match=r"--max-len 65 is out of range: qnli on this model allows 6..64"):
        runspec.validate(parse(65))


# -----------------------------------------------------------------------------
# all-mpnet-base-v2 itself

@pytest.fixture(scope="module")
def real():
    torch.manual_seed(0)
    return M.from_pretrained(REAL, num_labels=2, verbose=False).eval()


@needs_real
def test_real_checkpoint_loads_with_every_tensor(real):
    # 109,486,464 parameters in the checkpoint; its pooler (dense 768 x 768 + bias) is the one part left out
    encoder = sum(p.numel() for n, p in real.named_parameters() if not n.startswith("classifier."))
    assert encoder + 768 * 768 + 768 == 109_486_464
    assert (real.cfg.num_hidden_layers, real.cfg.hidden_size, real.cfg.max_tokens) == (12, 768, 512)


@needs_real
@needs_glue
def test_real_checkpoint_matches_transformers_on_qnli(real):
    theirs = transformers.MPNetForSequenceClassification.from_pretrained(REAL, num_labels=2).eval()
    theirs.classifier.load_state_dict(real.classifier.state_dict())  # the same fresh head on both sides
    rows = glue_rows("qnli", 8)
    reference = transformers.AutoTokenizer.from_pretrained(REAL)
    assert_same_encoding(REAL, reference, rows, 128)  # the real tokenizer.json
    batch = data.collate(rows, data.Tokenizer(REAL), 128)
    batch.pop("labels")
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        ours, hidden = real(**batch), real.encode(**batch)[0]
        ref = theirs(**batch, output_hidden_states=True)
    torch.testing.assert_close(ours, ref.logits, rtol=0, atol=1e-5)
    assert (hidden - ref.hidden_states[-1])[batch["attention_mask"].bool()].abs().max() <= 1e-4


@needs_real
@needs_glue
def test_real_checkpoint_peft_round_trip(real, tmp_path):
    peft = pytest.importorskip("peft", reason="export check needs peft (requirements-dev)")
    import copy
    model = copy.deepcopy(real)
    apply_lora(model, 8, generator=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    export_peft(model, str(tmp_path), base_model_path=REAL)
    base = transformers.MPNetForSequenceClassification.from_pretrained(REAL, num_labels=2).eval()
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    batch = data.collate(glue_rows("qnli", 8), data.Tokenizer(REAL), 128)
    batch.pop("labels")
    with torch.no_grad():
        ours = model(**batch)
        torch.testing.assert_close(adapted(**batch).logits, ours, rtol=0, atol=1e-5)
        assert (real(**batch) - ours).abs().max() > 1e-3  # the adapter really changes the output

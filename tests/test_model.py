"""model.py and the tokenizer against Hugging Face transformers as the oracle (test-only dependency)."""
import json
import os
import shutil

import pytest
import torch

import data
import model
from conftest import tiny_config

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle: pip install -r requirements-dev.txt")

SENTENCES = [
    "the movie was a triumph of style over substance.",
    "\"It's not bad,\" she said -- but it was.",
    "short",
    "An unexpectedly long sentence, with commas, numbers like 1,234.5 and UNUSUAL capitalisation, to force padding.",
]
SECONDS = ["What is it about?", "a reply", "Is this the second segment of a pair, much longer than the first one?", "ok"]


@pytest.fixture(scope="module")
def minilm():
    folder = model.default_model_dir()
    return folder, model.from_pretrained(folder, verbose=False).eval()


@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
def test_tokenizer_matches_bert_tokenizer_fast(minilm, pairs):
    folder, _ = minilm
    ours = data.Tokenizer(folder)(SENTENCES, SECONDS if pairs else None, max_len=24)
    theirs = transformers.BertTokenizerFast.from_pretrained(folder)(
        SENTENCES, SECONDS if pairs else None, padding=True, truncation=True, max_length=24, return_tensors="pt")
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key


def test_tokenizer_from_vocab_txt_matches_tokenizer_json(minilm, tmp_path):
    folder, _ = minilm
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(folder, name), tmp_path / name)
    a = data.Tokenizer(folder)(SENTENCES, SECONDS, max_len=32)
    b = data.Tokenizer(str(tmp_path))(SENTENCES, SECONDS, max_len=32)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
def test_minilm_matches_transformers(minilm, pairs):
    folder, ours = minilm
    theirs = transformers.BertModel.from_pretrained(folder).eval()
    batch = data.Tokenizer(folder)(SENTENCES, SECONDS if pairs else None, max_len=64)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        hidden, pooled = ours.encode(**batch)
        ref = theirs(**batch)
    real = batch["attention_mask"].bool()  # padded positions: ours are zero (unpadded compute), HF's are unused values
    assert (hidden - ref.last_hidden_state)[real].abs().max() <= 1e-4
    assert (hidden[~real] == 0).all()
    assert (pooled - ref.pooler_output).abs().max() <= 1e-4


def _hf_tiny(cls, folder, **cfg_overrides):
    cfg = tiny_config()
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, **cfg_overrides)
    torch.manual_seed(0)
    m = cls(hf_cfg).eval()
    m.save_pretrained(folder, safe_serialization=True)
    return m


def _random_batch(vocab, B=3, T=10):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    types = torch.zeros(B, T, dtype=torch.long)
    types[0, 5:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def test_bert_prefixed_checkpoint_with_pretraining_heads(tmp_path):
    ref = _hf_tiny(transformers.BertForPreTraining, tmp_path)  # keys bert.* and cls.*
    ours = model.from_pretrained(str(tmp_path), verbose=False).eval()
    batch = _random_batch(ref.config.vocab_size)
    with torch.no_grad():
        hidden, pooled = ours.encode(**batch)
        out = ref.bert(**batch)
    real = batch["attention_mask"].bool()
    assert (hidden - out.last_hidden_state)[real].abs().max() <= 1e-5
    assert (pooled - out.pooler_output).abs().max() <= 1e-5


def test_legacy_gamma_beta_names(tmp_path):
    from safetensors.torch import load_file, save_file
    ref = _hf_tiny(transformers.BertModel, tmp_path)
    path = tmp_path / "model.safetensors"
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in load_file(path).items()}
    assert any("gamma" in k for k in renamed)
    save_file(renamed, path)
    ours = model.from_pretrained(str(tmp_path), verbose=False).eval()
    batch = _random_batch(ref.config.vocab_size)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        assert (ours.encode(**batch)[0] - ref(**batch).last_hidden_state)[real].abs().max() <= 1e-5


def test_per_layer_cls_states_match_transformers_hidden_states(tmp_path):
    # a padded batch (the unpadded path) and one sequence alone (the plain path), against HF's hidden_states[i][:, 0]
    ref = _hf_tiny(transformers.BertModel, tmp_path)
    ours = model.from_pretrained(str(tmp_path), verbose=False).eval()
    batch = _random_batch(ref.config.vocab_size)
    for b in (batch, {k: v[2:, :3] for k, v in batch.items()}):
        states = []
        with torch.no_grad():
            logits = ours(**b)
            assert torch.equal(ours(**b, cls_states=states), logits)  # asking for them changes nothing
            theirs = ref(**b, output_hidden_states=True).hidden_states
        assert len(states) == len(theirs) == ref.config.num_hidden_layers + 1
        for mine, hf in zip(states, theirs):
            assert (mine - hf[:, 0]).abs().max() <= 1e-5


def test_classification_head_from_checkpoint_matches_transformers(tmp_path):
    ref = _hf_tiny(transformers.BertForSequenceClassification, tmp_path)
    ours = model.from_pretrained(str(tmp_path), verbose=False).eval()
    batch = _random_batch(ref.config.vocab_size)
    with torch.no_grad():
        assert (ours(**batch) - ref(**batch).logits).abs().max() <= 1e-5


def test_fresh_head_is_reported_and_initialised(minilm, capsys):
    folder, _ = minilm
    torch.manual_seed(0)
    m = model.from_pretrained(folder, num_labels=3)
    assert "classifier (3 labels) freshly initialised" in capsys.readouterr().out
    assert m.classifier.weight.shape == (3, 384)
    assert abs(m.classifier.weight.std().item() - 0.02) < 0.004 and (m.classifier.bias == 0).all()


def test_hf_name_maps_every_parameter_onto_the_checkpoint(minilm):
    from safetensors import safe_open
    folder, m = minilm
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        keys = {"bert." + k for k in f.keys()}
    for name in m.state_dict():
        if not name.startswith("classifier"):
            assert model.hf_name(name) in keys, name
    assert model.hf_name("layers.3.attn.query") == "bert.encoder.layer.3.attention.self.query"
    assert model.hf_name("layers.3.output") == "bert.encoder.layer.3.output.dense"


def test_dropout_active_in_train_off_in_eval(tiny_bert):
    batch = _random_batch(tiny_bert.cfg.vocab_size)
    tiny_bert.train()
    assert not torch.equal(tiny_bert(**batch), tiny_bert(**batch))
    tiny_bert.eval()
    assert torch.equal(tiny_bert(**batch), tiny_bert(**batch))


def test_padding_does_not_change_outputs(tiny_bert):
    # each sequence alone, unpadded, is the oracle for the padded batch (which takes the unpadded-compute path)
    tiny_bert.eval()
    g = torch.Generator().manual_seed(0)
    lengths = [7, 12, 3]
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 100, (n,), generator=g)
        mask[i, :n] = 1
    with torch.no_grad():
        alone = torch.cat([tiny_bert(ids[i:i + 1, :n]) for i, n in enumerate(lengths)])
        batched = tiny_bert(ids, attention_mask=mask)
    assert torch.allclose(alone, batched, atol=1e-5)


def test_unpadded_training_gradients_match_padded(tiny_bert):
    # gradients through the unpadded path equal those of the same sequences run one by one
    tiny_bert.eval()
    ids = torch.randint(1, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 4:] = 0
    tiny_bert(ids, attention_mask=mask).sum().backward()
    batched = {n: p.grad.clone() for n, p in tiny_bert.named_parameters()}
    tiny_bert.zero_grad()
    (tiny_bert(ids[:1]).sum() + tiny_bert(ids[1:, :4]).sum()).backward()
    for n, p in tiny_bert.named_parameters():
        assert torch.allclose(batched[n], p.grad, atol=1e-5), n


# --- every bad path gives one clear error naming the file ---------------------------------------------------------

def _copy_tiny(tmp_path):
    _hf_tiny(transformers.BertModel, tmp_path)
    return tmp_path


def test_missing_folder(tmp_path):
    with pytest.raises(model.CheckpointError, match="model folder not found"):
        model.from_pretrained(str(tmp_path / "nope"))


def test_missing_config(tmp_path):
    folder = _copy_tiny(tmp_path)
    os.remove(folder / "config.json")
    with pytest.raises(model.CheckpointError, match=r"config.json: missing"):
        model.from_pretrained(str(folder))


def test_non_bert_checkpoint(tmp_path):
    folder = _copy_tiny(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(model.CheckpointError, match=r"config.json: model_type is 'gpt2'"):
        model.from_pretrained(str(folder))


def test_shape_mismatch(tmp_path):
    folder = _copy_tiny(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(model.CheckpointError, match=r"model.safetensors: tensor shapes disagree.*intermediate"):
        model.from_pretrained(str(folder))


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file
    folder = _copy_tiny(tmp_path)
    state = load_file(folder / "model.safetensors")
    state.pop("pooler.dense.weight")
    state["encoder.layer.7.output.dense.weight"] = torch.zeros(1)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(model.CheckpointError, match=r"missing \['pooler.weight'\]; unexpected \['encoder.layer.7"):
        model.from_pretrained(str(folder))


def test_pickle_only_checkpoint_is_refused(tmp_path):
    folder = _copy_tiny(tmp_path)
    os.rename(folder / "model.safetensors", folder / "pytorch_model.bin")
    with pytest.raises(model.CheckpointError, match="never load"):
        model.from_pretrained(str(folder))


def test_corrupt_safetensors(tmp_path):
    folder = _copy_tiny(tmp_path)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(model.CheckpointError, match="cannot be read as safetensors"):
        model.from_pretrained(str(folder))

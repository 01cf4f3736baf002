import pytest
import torch

from model import Bert, BertConfig


def tiny_config(**kw):
    """A shrunk BERT for fast tests (same code path as the real one)."""
    base = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64)
    base.update(kw)
    return BertConfig(**base)


@pytest.fixture
def tiny_bert():
    torch.manual_seed(0)
    return Bert(tiny_config())

import pytest
import torch

from model import Bert, BertConfig, MPNetConfig

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def tiny_config(**kw):
    """A shrunk BERT for fast tests (same code path as the real one)."""
    return BertConfig(**{**TINY, "max_position_embeddings": 64, **kw})


def tiny_mpnet_config(**kw):
    """A shrunk MPNet: 64 token positions after the two that padding reserves."""
    return MPNetConfig(**{**TINY, "max_position_embeddings": 66, **kw})


@pytest.fixture
def tiny_bert():
    torch.manual_seed(0)
    return Bert(tiny_config())

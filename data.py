"""
Text in, tensors out: the BERT tokenizer, and (below it) GLUE reading and batching.
"""
import json
import os

import torch


# -----------------------------------------------------------------------------
# tokenizer

class Tokenizer:
    """BERT WordPiece via the `tokenizers` package: tokenizer.json when the folder has one, else vocab.txt.

    Pairs are encoded as BERT was trained: [CLS] a [SEP] b [SEP] with token_type_ids 0 for a and 1 for b.
    """

    def __init__(self, folder):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.implementations import BertWordPieceTokenizer
        tok_json, vocab = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "vocab.txt")
        if os.path.isfile(tok_json):
            self.tok = HFTokenizer.from_file(tok_json)
        elif os.path.isfile(vocab):
            self.tok = BertWordPieceTokenizer(vocab, lowercase=_do_lower_case(folder))._tokenizer
        else:
            raise FileNotFoundError(f"{folder}: has neither tokenizer.json nor vocab.txt; cannot build a tokenizer")
        self.pad_id = self.tok.token_to_id("[PAD]")
        if self.pad_id is None:
            raise ValueError(f"{folder}: the vocabulary has no [PAD] token; not a BERT tokenizer")
        self.tok.no_padding()  # tokenizer.json may carry its own padding/truncation; we set ours per call

    def __call__(self, texts_a, texts_b=None, max_len=128):
        """Encode a batch; returns input_ids, token_type_ids, attention_mask as (B, T) int64 tensors,
        truncated to max_len (longest-first for pairs, as BERT's reference tokenizer) and padded to the longest."""
        if texts_b is not None and len(texts_b) != len(texts_a):
            raise ValueError(f"{len(texts_a)} first texts but {len(texts_b)} second texts")
        self.tok.enable_truncation(max_len, strategy="longest_first")
        inputs = list(texts_a) if texts_b is None else list(zip(texts_a, texts_b))
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


def _do_lower_case(folder):
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return bool(json.load(f).get("do_lower_case", True))
    return True  # BERT's reference tokenizer default

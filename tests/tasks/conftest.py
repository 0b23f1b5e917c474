"""Tiny tokenizers and models built in code for the tasks/ tests."""
from __future__ import annotations

import re

import pytest
import torch

from experts.scoring import HFCausalLM, ScoringModel

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def make_tokenizer(texts):
    """Word-level tokenizer over the words and punctuation of `texts` (+ specials); decode joins with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)})
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_llama(vocab_size, max_positions=256, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


class ToyModel(ScoringModel):
    """A ScoringModel defined by `dist(prefix ids) -> (V,) log-probs`; token_logprobs calls it per position."""

    def __init__(self, tokenizer, max_length=512, name="toy"):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.name = name
        self.V = len(tokenizer)
        self.calls = []

    def dist(self, prefix: list[int]) -> torch.Tensor:  # (V,)
        raise NotImplementedError

    def token_logprobs(self, input_ids, attention_mask=None, prefix_texts=None):
        self.calls.append(("token", input_ids.clone(), attention_mask.clone(), list(prefix_texts or [])))
        B, T = input_ids.shape
        out = torch.zeros(B, T - 1)
        for b in range(B):
            n = int(attention_mask[b].sum())
            ids = input_ids[b, :n].tolist()
            for t in range(1, n):
                out[b, t - 1] = self.dist(ids[:t])[ids[t]]
        return out

    def next_token_logprobs(self, input_ids, attention_mask=None, prefix_texts=None):
        self.calls.append(("next", input_ids.clone(), attention_mask.clone(), list(prefix_texts or [])))
        rows = []
        for b in range(input_ids.shape[0]):
            n = int(attention_mask[b].sum())
            rows.append(self.dist(input_ids[b, :n].tolist()))
        return torch.stack(rows)


class FixedModel(ToyModel):
    """The same next-token distribution everywhere: log_softmax(logits)."""

    def __init__(self, tokenizer, logits: torch.Tensor, **kw):
        super().__init__(tokenizer, **kw)
        self.lp = torch.log_softmax(logits.float(), -1)

    def dist(self, prefix):
        return self.lp


@pytest.fixture
def hf_model_factory():
    def build(texts, max_positions=256, max_length=None):
        tok = make_tokenizer(texts)
        model = tiny_llama(len(tok), max_positions)
        return HFCausalLM(model, tok, device="cpu", name="tiny-llama", max_length=max_length)

    return build

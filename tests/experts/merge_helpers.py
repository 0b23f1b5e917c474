"""Tiny in-code models, tokenizer and embedder for the merge tests (ensembles, averaging, MoE)."""
from __future__ import annotations

import zlib

import numpy as np
import torch

N_WORDS = 60  # vocabulary: 4 specials + w0..w59
SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(N_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


VOCAB = len(SPECIALS) + N_WORDS


def tiny_llama(seed: int = 0, vocab: int = VOCAB, hidden: int = 24, layers: int = 2, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=40, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the 0.02 init so experts disagree visibly
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model


def save_llama(path, seed: int = 0, **kw):
    model = tiny_llama(seed, **kw)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


class HashEmbedder:
    """Deterministic bag-of-words embedder: sum of fixed random vectors per word, L2-normalised (zeros if empty)."""

    def __init__(self, dim: int = 8, seed: int = 0):
        self.dim, self.seed = dim, seed

    def _vec(self, word: str) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(word.encode()) + self.seed)
        return rng.standard_normal(self.dim)

    def transform(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i] += self._vec(w)
            n = np.linalg.norm(out[i])
            if n > 0:
                out[i] /= n
        return out


def random_text(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(f"w{i}" for i in rng.integers(0, N_WORDS, n_words))

"""Byte-level BPE tokenizer: round trip, specials, loadable with AutoTokenizer."""
import pytest

from corpus.io import InputError
from experts.tokenizer import BOS, EOS, PAD, train_tokenizer

TEXTS = ["The cat sat on the mat.", "Stocks fell 3.2% on Tuesday — ünïcödé ✓", "def f(x):\n    return x * 2\n"] * 20


def test_round_trip_and_reload(tmp_path):
    from transformers import AutoTokenizer

    tok = train_tokenizer(TEXTS, tmp_path / "tok", vocab_size=300, min_frequency=2)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
    assert [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2]
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in set(TEXTS) | {"never seen: 日本語 and emoji 🙂"}:
        ids = again(text, add_special_tokens=False)["input_ids"]
        assert again.decode(ids) == text
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert len(again) <= 300


def test_empty_corpus_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no non-empty"):
        train_tokenizer(["", ""], tmp_path / "tok", vocab_size=300)
    assert not (tmp_path / "tok").exists()

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


def test_sampled_training_reads_the_seeded_sample_and_records_it(tmp_path):
    """A train split over `sample_chars` trains on the seeded per-row sample (empty and null documents skipped,
    each cut to SAMPLE_DOC_CHARS): the same tokenizer as training on that list; the stage output records the cap."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from experts import tokenizer as T

    rng = np.random.default_rng(3)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda"]
    texts = [" ".join(rng.choice(words, 40)) for _ in range(300)]
    texts[5], texts[7] = "", None
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.table({"id": [str(i) for i in range(300)], "text": pa.array(texts, pa.string())}),
                   tmp_path / "corpus" / "train.parquet", row_group_size=64)
    total = sum(len(t or "") for t in texts)
    info = T.tokenizer_for_corpus(tmp_path / "corpus", tmp_path / "tok", vocab_size=300, sample_chars=total // 3,
                                  seed=4)
    keep = np.random.default_rng(4).random(300) < (total // 3) / total
    expected = [t[:T.SAMPLE_DOC_CHARS] for t, k in zip(texts, keep) if k and t]
    assert info["sample_docs"] == int(keep.sum()) < 300 and info["sample_chars"] == total // 3
    assert info["total_chars"] == total
    T.train_tokenizer(expected, tmp_path / "ref", vocab_size=300)
    assert (tmp_path / "tok" / "tokenizer.json").read_text() == (tmp_path / "ref" / "tokenizer.json").read_text()

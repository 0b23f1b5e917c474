"""Shard packing and the PackedBlocks reader."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus.io import InputError
from experts.data import PackedBlocks, shard_corpus
from experts.tokenizer import train_tokenizer

DOCS = {
    0: ["the cat sat on the mat and purred quietly"] * 12,
    1: ["stock prices rose sharply after the earnings call"] * 9,
    2: ["hi"],  # too little text for one block
}


@pytest.fixture
def run(tmp_path):
    rows = [(f"d{c}_{i}", t, c) for c, texts in DOCS.items() for i, t in enumerate(texts)]
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "assign").mkdir()
    for split, part in (("train", rows), ("valid", rows[:6])):
        pq.write_table(pa.table({"id": [r[0] for r in part], "text": [r[1] for r in part]}), tmp_path / "corpus" / f"{split}.parquet")
        pq.write_table(pa.table({"id": [r[0] for r in part], "cluster_id": pa.array([r[2] for r in part], pa.int32()),
                                 "distance": pa.array([0.0] * len(part), pa.float32())}), tmp_path / "assign" / f"{split}.parquet")
    train_tokenizer([r[1] for r in rows], tmp_path / "tok", vocab_size=300)
    return tmp_path, rows


def test_packing_conserves_tokens_and_separates_documents(run):
    from transformers import AutoTokenizer

    tmp, rows = run
    seq = 16
    meta = shard_corpus(tmp / "corpus", tmp / "assign", tmp / "tok", tmp / "shards", seq_len=seq)
    tok = AutoTokenizer.from_pretrained(tmp / "tok")
    on_disk = json.loads((tmp / "shards" / "meta.json").read_text())
    assert on_disk["n_clusters"] == 3 and on_disk["eos_id"] == tok.eos_token_id and on_disk["dtype"] == "uint16"
    for c, texts in DOCS.items():
        stream = []
        for r in rows:  # corpus order
            if r[2] == c:
                stream += [tok.bos_token_id] + tok(r[1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        info = meta["clusters"][str(c)]["train"]
        assert info["n_tokens"] == len(stream) and info["n_docs"] == len(texts)
        blocks = np.load(tmp / "shards" / f"cluster_{c:03d}.npy")
        assert blocks.shape == (len(stream) // seq, seq) and blocks.dtype == np.uint16
        np.testing.assert_array_equal(blocks.reshape(-1), stream[: blocks.size])  # packed, tail dropped
    assert meta["empty_clusters"] == [2]
    assert np.load(tmp / "shards" / "valid_cluster_000.npy").shape[1] == seq


def test_packed_blocks_seeded_order_covers_every_block(tmp_path):
    a = np.arange(5 * 4, dtype=np.uint16).reshape(5, 4)
    b = 100 + np.arange(3 * 4, dtype=np.uint16).reshape(3, 4)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    data = PackedBlocks([tmp_path / "a.npy", tmp_path / "b.npy"], seq_len=4, seed=7)
    assert len(data) == 8 and data.n_tokens == 32
    epoch0 = data.blocks(0, 8)
    assert sorted(map(tuple, epoch0)) == sorted(map(tuple, np.concatenate([a, b]).astype(np.int64)))
    again = PackedBlocks([tmp_path / "a.npy", tmp_path / "b.npy"], seq_len=4, seed=7)
    np.testing.assert_array_equal(again.blocks(3, 9), data.blocks(3, 9))  # random access = resume position
    np.testing.assert_array_equal(again.blocks(0, 16)[:8], epoch0)
    assert not np.array_equal(data.blocks(8, 8), epoch0)  # the next epoch is reshuffled
    with pytest.raises(InputError, match="expected seq_len 5"):
        PackedBlocks([tmp_path / "a.npy"], seq_len=5)
    with pytest.raises(InputError, match="missing shard"):
        PackedBlocks([tmp_path / "nope.npy"])


def test_missing_assignment_is_an_input_error(run):
    tmp, rows = run
    pq.write_table(pa.table({"id": ["x"], "cluster_id": pa.array([0], pa.int32())}), tmp / "assign" / "train.parquet")
    with pytest.raises(InputError, match="have no cluster"):
        shard_corpus(tmp / "corpus", tmp / "assign", tmp / "tok", tmp / "shards", seq_len=16)
    assert not (tmp / "shards").exists()


def test_whole_corpus_tokens_give_the_same_cluster_shards(run):
    """The seed/dense shards do not depend on the clustering; per-cluster shards cut from their token streams
    equal those made by tokenizing again."""
    from experts.data import corpus_shard_name, tokenize_corpus

    tmp, rows = run
    seq = 16
    tok_meta = tokenize_corpus(tmp / "corpus", tmp / "tok", tmp / "tokens", seq_len=seq)
    direct = shard_corpus(tmp / "corpus", tmp / "assign", tmp / "tok", tmp / "a", seq_len=seq)
    reused = shard_corpus(tmp / "corpus", tmp / "assign", tmp / "tok", tmp / "b", seq_len=seq, tokens_dir=tmp / "tokens")
    assert direct == {**reused, "tokenizer_dir": direct["tokenizer_dir"]}
    for p in sorted((tmp / "a").glob("*.npy")):
        np.testing.assert_array_equal(np.load(p), np.load(tmp / "b" / p.name))
    # the whole corpus, in corpus order: every cluster's tokens, blocks cut from one stream
    train = tok_meta["splits"]["train"]
    assert train["n_docs"] == len(rows) and train["n_tokens"] == sum(v["train"]["n_tokens"] for v in direct["clusters"].values())
    stream = np.load(tmp / "tokens" / "train_tokens.npy")
    blocks = np.load(tmp / "tokens" / corpus_shard_name("train"))
    assert blocks.shape == (len(stream) // seq, seq)
    np.testing.assert_array_equal(blocks.reshape(-1), stream[: blocks.size])
    off = np.load(tmp / "tokens" / "train_offsets.npy")
    assert off[0] == 0 and off[-1] == len(stream) and len(off) == len(rows) + 1
    with pytest.raises(InputError, match="do not hold the"):
        pq.write_table(pa.table({"id": ["x"], "text": ["y"]}), tmp / "corpus" / "valid.parquet")
        pq.write_table(pa.table({"id": ["x"], "cluster_id": pa.array([0], pa.int32())}), tmp / "assign" / "valid.parquet")
        shard_corpus(tmp / "corpus", tmp / "assign", tmp / "tok", tmp / "c", seq_len=seq, tokens_dir=tmp / "tokens")


def test_long_documents_tokenize_without_the_length_warning(tmp_path, caplog):
    """Documents longer than the tokenizer's model_max_length are packed into blocks on purpose: tokenizing them
    (the corpus encoder, `experts.data._encode_chunk`) must not print transformers' "longer than the specified
    maximum sequence length" warning."""
    from experts.data import _encode_chunk, _encoder_spec, _init_encoder
    from experts.tokenizer import load_tokenizer, train_tokenizer

    train_tokenizer(["alpha beta gamma delta"] * 50, tmp_path / "tok", vocab_size=300)
    tok = load_tokenizer(tmp_path / "tok")
    tok.model_max_length = 8
    tok.save_pretrained(tmp_path / "tok")
    with caplog.at_level("WARNING"):
        _init_encoder(_encoder_spec(tmp_path / "tok"))
        tokens, lengths = _encode_chunk(["alpha beta gamma delta " * 20])
    assert int(lengths[0]) > 8 and len(tokens) == int(lengths.sum())
    assert not [r for r in caplog.records if "maximum sequence length" in r.getMessage()]


def test_plain_tokenizer_folder_loads_without_transformers_with_the_same_ids(run, tmp_path):
    """TokenizeCorpus/ShardCorpus read a TrainTokenizer folder straight from tokenizer.json (no transformers
    import): same vocabulary size, eos, bos and ids as transformers' fast tokenizer; any other folder (here: a
    config key transformers acts on) goes through transformers."""
    import shutil

    from experts.data import _encode_chunk, _encoder_spec, _init_encoder, _load_fast_tokenizer, _plain_backend
    from experts.tokenizer import load_tokenizer

    tok_dir = run[0] / "tok"
    plain = _plain_backend(tok_dir)
    assert plain is not None
    backend, vocab_size, eos, prefix = plain
    hf = load_tokenizer(tok_dir)
    assert (vocab_size, eos, prefix) == (len(hf), hf.eos_token_id, [hf.bos_token_id])
    texts = ["the cat sat on the mat", "stock prices rose 12.5%", "", "ünïcödé  text\n\nwith  spaces"]
    assert [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)] == \
        [hf(t, add_special_tokens=False)["input_ids"] for t in texts]
    _init_encoder(_encoder_spec(tok_dir))
    tokens, lengths = _encode_chunk(texts)
    assert tokens.tolist() == sum(([hf.bos_token_id] + hf(t, add_special_tokens=False)["input_ids"] +
                                   [hf.eos_token_id] for t in texts), [])
    four = tmp_path / "four"  # a transformers 4 folder: the specials also in special_tokens_map.json
    shutil.copytree(tok_dir, four)
    (four / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>",
                                                              "pad_token": "<|pad|>"}))
    assert _plain_backend(four)[1:] == (vocab_size, eos, prefix)
    (four / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|pad|>"}))  # disagrees: transformers
    assert _plain_backend(four) is None
    other = tmp_path / "other"
    shutil.copytree(tok_dir, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_prefix_space": True}))
    assert _plain_backend(other) is None
    assert _load_fast_tokenizer(other)[0].is_fast

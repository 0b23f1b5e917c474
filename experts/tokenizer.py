"""Byte-level BPE tokenizer for scratch seed models (the `tokenizer-<h>/` folder).

Byte-level BPE (GPT-2 / RoBERTa style, Radford et al. 2019) trained with the `tokenizers` library: every byte
is in the base alphabet, so any UTF-8 text round-trips exactly. Three specials: `<|bos|>`, `<|eos|>`, `<|pad|>`.
No special token is added automatically on encode; `experts.data.shard_corpus` writes `bos + doc + eos`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

from corpus.io import InputError, atomic_dir
from corpus.layout import TRAIN_SPLIT

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def _progress(texts: Iterable[str], counter: list[int]) -> Iterator[str]:
    from tqdm.auto import tqdm

    total = len(texts) if hasattr(texts, "__len__") else None  # type: ignore[arg-type]
    for text in tqdm(texts, total=total, desc="tokenizer: reading documents", unit="doc", mininterval=2.0):
        if text:
            counter[0] += 1
            yield text


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    model_max_length: int = 1024,
):
    """Train a byte-level BPE tokenizer on `texts` and save it to `out_dir` (atomically).

    Returns the `PreTrainedTokenizerFast`; `AutoTokenizer.from_pretrained(out_dir)` loads the same tokenizer
    (files: tokenizer.json, tokenizer_config.json, special_tokens_map.json). Ids 0, 1, 2 are bos, eos, pad.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from experts.compat import make_portable

    if vocab_size < 256 + 3:
        raise InputError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least 259 entries")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    n_docs = [0]
    tok.train_from_iterator(_progress(texts, n_docs), trainer=trainer)
    if n_docs[0] == 0:
        raise InputError("cannot train a tokenizer: no non-empty training documents")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=model_max_length
    )
    with atomic_dir(out_dir) as tmp:
        fast.save_pretrained(tmp)
        make_portable(tmp)  # a tokenizer class that transformers 4.x knows too (experts.compat)
    log.info("tokenizer: %d docs, vocab %d -> %s", n_docs[0], len(fast), out_dir)
    return fast


def load_tokenizer(path: str | os.PathLike):
    """`AutoTokenizer.from_pretrained(path)` with an InputError naming the path when it fails."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any library failure becomes one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load a tokenizer from {Path(path)}: {first}") from None


SAMPLE_CHARS = 100_000_000  # the BPE trainer reads at most about this many characters of the train split
SAMPLE_DOC_CHARS = 1_000_000  # ... and at most this prefix of each sampled document


def tokenizer_for_corpus(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, seed_model: str = "scratch",
                         vocab_size: int = 8192, sample_chars: int = SAMPLE_CHARS, seed: int = 0) -> dict:
    """The tokenizer of a run in `out_dir`: for `seed_model` 'scratch', byte-level BPE of `vocab_size` trained on
    `<corpus_dir>/train.parquet`'s text column (`train_tokenizer`); otherwise the seed model's own tokenizer, copied.
    A train split of more than `sample_chars` characters is sampled: each document is kept with probability
    sample_chars / total (seeded, decided per row, streamed) and read up to `SAMPLE_DOC_CHARS`; a smaller one is
    read whole (BPE merges settle long before 100M characters). Returns {"vocab_size", "sample_docs", "total_docs",
    "sample_chars" (the cap), "total_chars"} or {"from": seed_model}."""
    if seed_model != "scratch":
        load_tokenizer(seed_model).save_pretrained(out_dir)
        return {"from": seed_model}
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq  # heavy: only when a tokenizer is trained

    pf = pq.ParquetFile(Path(corpus_dir) / TRAIN_SPLIT)
    n = pf.metadata.num_rows
    total = sum(int(pc.sum(pc.utf8_length(b.column(0))).as_py() or 0)
                for b in pf.iter_batches(columns=["text"], batch_size=8192))
    keep = None
    if total > sample_chars:
        keep = np.random.default_rng(seed).random(n) < sample_chars / total  # (n_docs,) bool
        log.info("tokenizer: training on a seeded sample of %d of %d documents (%d of %d characters wanted)",
                 int(keep.sum()), n, sample_chars, total)

    def texts():
        start = 0
        for batch in pf.iter_batches(columns=["text"], batch_size=1024):
            col = batch.column(0)
            if keep is None:
                yield from col.to_pylist()
            else:  # only the sampled documents become Python strings
                yield from (t[:SAMPLE_DOC_CHARS] for t in col.filter(keep[start: start + len(col)]).to_pylist() if t)
            start += len(col)

    tok = train_tokenizer(texts(), out_dir, vocab_size=vocab_size)
    return {"vocab_size": len(tok), "sample_docs": int(n if keep is None else keep.sum()), "total_docs": n,
            "sample_chars": int(sample_chars), "total_chars": int(total)}

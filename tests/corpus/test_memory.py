"""Peak memory of the data stages does not grow with the corpus: each stage runs in a fresh subprocess on a corpus
and on one 8× larger, with small chunks, and its peak resident set (`resource.getrusage(...).ru_maxrss`) may grow
by a fraction of the larger corpus's text only. Not timed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = r"""
import json, resource, sys
from pathlib import Path

import clustering.embed as embed
import corpus.read as read
import experts.data as data

read.ROW_GROUP_ROWS = 64
read.READ_CHUNK_BYTES = 256 << 10
embed.CHUNK_DOCS = 64
data.CHUNK_DOCS = 64
stage, src, out, tok = sys.argv[1], *map(Path, sys.argv[2:5])
if stage == "prepare":
    read.prepare_corpus(src, out / "corpus", batch_rows=64)
elif stage == "embed":
    embed.embed_corpus(out / "corpus", out / "emb", n_components=16, fit_sample=500)
else:
    data.tokenize_corpus(out / "corpus", tok, out / "tokens", seq_len=64)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
STAGES = ("prepare", "embed", "tokenize")


def write_docs(path: Path, n_docs: int) -> int:
    """`n_docs` JSON lines of about 3 kB of text each; returns the bytes of text."""
    rng = np.random.default_rng(n_docs)
    vocab = np.array([f"w{i}" for i in range(3000)])
    total = 0
    with open(path, "w") as f:
        for i in range(n_docs):
            text = " ".join(rng.choice(vocab, size=600))
            total += len(text)
            f.write(json.dumps({"text": text}) + "\n")
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux")
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    from experts.tokenizer import train_tokenizer

    train_tokenizer([" ".join(f"w{i}" for i in range(j, 3000, 7)) for j in range(7)] * 3, tmp_path / "tok",
                    vocab_size=300)
    peaks: dict = {}
    text = {}
    for scale, n_docs in (("1x", 1000), ("8x", 8000)):
        src = tmp_path / f"{scale}.jsonl"
        text[scale] = write_docs(src, n_docs)
        for stage in STAGES:  # one fresh process per stage: no memory an earlier stage freed is reused
            run = subprocess.run([sys.executable, "-c", SCRIPT, stage, str(src), str(tmp_path / scale),
                                  str(tmp_path / "tok")], capture_output=True, text=True, timeout=600,
                                 env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            assert run.returncode == 0, run.stderr[-2000:]
            peaks.setdefault(stage, {})[scale] = float(run.stdout.strip().splitlines()[-1])  # MiB, ru_maxrss
    growth_allowed = max(12.0, 0.25 * text["8x"] / 2**20)  # MiB; the 8× corpus holds ~23 MiB of text
    for stage, peak in peaks.items():
        assert peak["8x"] - peak["1x"] < growth_allowed, (stage, peaks, growth_allowed)

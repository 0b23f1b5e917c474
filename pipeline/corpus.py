"""Corpus stages: the built-in demo corpus, and reading any corpus into `corpus-<h>/`."""
from __future__ import annotations

from pathlib import Path

from pipeline.params import CorpusParams, carries
from pipeline.stage import Stage
from pipeline.stamps import files_fingerprint

CORPUS_FILE_CACHE = "cache/corpus-files"  # under --run-dir: each input file read once, kept by (path, size, mtime)


class WriteDemoCorpus(Stage):
    """`corpus.demo.write_demo_corpus` → `demo-corpus-<h>/{train,valid,test}.jsonl.gz` (only for --corpus demo)."""

    folder = "demo-corpus"
    hashed = ("seed",)

    def requires(self):
        return []

    def extra_hash(self):
        """The generator's version: a new demo corpus gets a new folder (and everything built from it)."""
        from corpus.demo import GENERATOR

        return GENERATOR

    def build(self, out: Path) -> dict:
        from corpus.demo import write_demo_corpus

        write_demo_corpus(out, seed=self.seed)
        return {"files": sorted(p.name for p in out.iterdir())}


@carries(WriteDemoCorpus)
class PrepareCorpus(Stage, CorpusParams):
    """`corpus.read.prepare_corpus` → `corpus-<h>/{train,valid,test}.parquet` (id, text[, label]) + stats.json.
    Each input file is read once into `<run_dir>/cache/corpus-files/` (by path, size and mtime): a rerun after one
    file of many changed reads only that file again, then rewrites the splits."""

    folder = "corpus"
    hashed = ("corpus", "text_field", "label", "max_docs", "seed")

    def requires(self):
        return [self.clone(WriteDemoCorpus)] if self.corpus == "demo" else []

    def source(self) -> str:
        return str(self.requires()[0].out_path()) if self.corpus == "demo" else self.corpus

    def extra_hash(self):
        """Name, size and mtime of the local corpus files, so editing the corpus in place rereads it."""
        if self.corpus == "demo":
            return None
        return files_fingerprint(self.corpus)

    def build(self, out: Path) -> dict:
        from corpus.read import prepare_corpus

        stats = prepare_corpus(self.source(), out, text_field=self.text_field, label_field=self.label,
                               seed=self.seed, max_docs=self.max_docs or None, workers=self.data_workers_value,
                               cache_dir=Path(self.run_dir) / CORPUS_FILE_CACHE, streaming=self.corpus_streaming)
        return {"n_docs": stats["n_docs"], "n_empty_dropped": stats["n_empty_dropped"]}

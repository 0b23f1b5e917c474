"""Token-level perplexity of any `ScoringModel` on a set of documents, overall, per cluster and per label.

    PPL = exp( Σ_docs Σ_t −log p(x_t | x_<t) / Σ_docs n_tokens ),   bits/byte = Σ NLL / (ln 2 · Σ UTF-8 bytes)

Each document is scored as BOS + its tokens, every token predicted exactly once. Documents longer than the
model context are cut into windows of `model.max_length` tokens that share one token (window w starts where
window w−1's last prediction was made, so predicted tokens never overlap); window w > 0 sees the earlier
windows only as text through `prefix_texts` (so a routing model such as the c-BTM ensemble routes on the
whole document prefix, Gururangan et al. 2023 §2.3), not as attention context. Windows of many documents are
batched together, longest first.

`oracle_perplexity` assembles the oracle-routing reference (each document scored by its own cluster's expert)
from the experts' evaluations, without scoring anything again.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import torch

from corpus.io import InputError, write_json
from corpus.read import parquet_file
from experts.run_models import ORACLE
from experts.scoring import document_windows

log = logging.getLogger(__name__)


class EvaluationDocs:
    """The documents of `<corpus_dir>/<split>.parquet` with their `cluster_id` from `<assignments_dir>/<split>.parquet`
    (`evaluate_perplexity`'s input): all of them, or a sample of `max_docs` drawn with `seed`, in file order.
    Iterating reads `batch_rows` rows at a time, so a split of millions of documents is never held; `len()` is
    the number of documents it yields."""

    def __init__(self, corpus_dir: str | os.PathLike, assignments_dir: str | os.PathLike, split: str,
                 max_docs: int = 0, seed: int = 0, batch_rows: int = 1024):
        self.path = os.path.join(corpus_dir, f"{split}.parquet")
        self.assignments = os.path.join(assignments_dir, f"{split}.parquet")
        self.n = parquet_file(self.path).metadata.num_rows
        parquet_file(self.assignments, ["id", "cluster_id"])
        self.keep = None
        if max_docs and self.n > max_docs:
            keep = np.zeros(self.n, bool)
            keep[np.random.default_rng(seed).choice(self.n, max_docs, replace=False)] = True
            self.keep = keep  # (n_docs,) bool: the sampled rows
        self.batch_rows = int(batch_rows)

    def __len__(self) -> int:
        return self.n if self.keep is None else int(self.keep.sum())

    def __iter__(self):
        import pyarrow as pa
        import pyarrow.compute as pc

        from corpus.stream import exact_tables

        docs_pf, assign_pf = parquet_file(self.path), parquet_file(self.assignments)
        cluster_of = None
        chunks = zip(exact_tables(docs_pf, docs_pf.schema_arrow.names, self.batch_rows),
                     exact_tables(assign_pf, ["id", "cluster_id"], self.batch_rows)) \
            if assign_pf.metadata.num_rows == self.n else ((t, None) for t in
                                                          exact_tables(docs_pf, docs_pf.schema_arrow.names, self.batch_rows))
        start = 0
        for table, assign in chunks:
            rows_n = table.num_rows
            if self.keep is not None:
                mask = self.keep[start: start + rows_n]
                start += rows_n
                if not mask.any():
                    continue
                table = table.filter(pa.array(mask))
                assign = assign.filter(pa.array(mask)) if assign is not None else None
            ids = table.column("id").cast(pa.string())
            if assign is not None and cluster_of is None and \
                    pc.all(pc.equal(ids, assign.column("id").cast(pa.string()))).as_py() is not False:
                cids = assign.column("cluster_id").to_pylist()
            else:  # an assignment file in another order: look ids up (a dict of every id)
                if cluster_of is None:
                    t = assign_pf.read(columns=["id", "cluster_id"])
                    cluster_of = dict(zip(t.column("id").cast(pa.string()).to_pylist(),
                                          t.column("cluster_id").to_pylist()))
                cids = [cluster_of[i] for i in ids.to_pylist()]
            for row, c in zip(table.to_pylist(), cids):
                row["cluster_id"] = int(c)
                yield row


def evaluation_docs(corpus_dir: str | os.PathLike, assignments_dir: str | os.PathLike, split: str,
                    max_docs: int = 0, seed: int = 0) -> EvaluationDocs:
    """`EvaluationDocs` of a split: every document, or a seeded sample of `max_docs`, streamed in file order."""
    return EvaluationDocs(corpus_dir, assignments_dir, split, max_docs=max_docs, seed=seed)


def _group_metrics(nll: float, n_tokens: int, n_bytes: int, n_docs: int) -> dict:
    mean = nll / n_tokens if n_tokens else float("nan")
    return {
        "perplexity": math.exp(mean) if n_tokens else None,
        "nll_per_token": mean if n_tokens else None,
        "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes else None,
        "n_tokens": int(n_tokens),
        "n_bytes": int(n_bytes),
        "n_docs": int(n_docs),
    }


@torch.no_grad()
def evaluate_perplexity(
    model,
    docs: Iterable[dict],
    out_path: str | os.PathLike | None = None,
    max_docs: int | None = None,
    batch_size: int = 8,
    chunk_docs: int = 256,
    per_doc: bool = False,
    max_tokens: int | None = None,
    max_doc_tokens: int | None = None,
) -> dict:
    """Perplexity of `model` (a `ScoringModel`) on `docs` (dicts with `id`, `text`, optional `label`,
    optional `cluster_id`).

    Returns (and writes to `out_path` atomically, when given): model, `perplexity`, `bits_per_byte`,
    `overall` / `per_cluster` / `per_label` (each: perplexity, nll_per_token, bits_per_byte, n_tokens,
    n_bytes, n_docs), n_docs, n_empty_docs, n_tokens, n_windows, max_length, wall_time_s, tokens_per_s, and
    with `per_doc=True` a `docs` list of {id, nll, n_tokens}. Documents are read `chunk_docs` at a time; the
    windows of a chunk are sorted by length and scored `model.pooled_rows(batch_size)` windows per call
    (`batch_size` for one model; an ensemble pools k / top_k times as many, so that each expert call gets about
    `batch_size` rows). Batches stay on the CPU: the model moves them, and an ensemble routes the next batch on
    the CPU while its experts run on the GPU.

    Caps (None or 0: none): each document scores at most its first `max_doc_tokens` tokens (its text is cut to
    16 characters per token before tokenizing, so a 50 MB document costs what a short one does), and the whole
    call at most `max_tokens` tokens: the document that reaches it is cut, later ones are left out. The result
    says what was cut: `n_docs_cut`, `n_docs_left_out`, `max_tokens`, `max_doc_tokens`; `n_bytes` of a cut
    document counts the bytes of its scored prefix.
    """
    from tqdm.auto import tqdm

    L = int(model.max_length)
    bos = model.bos_ids()
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    total = None
    if hasattr(docs, "__len__"):
        total = len(docs) if max_docs is None else min(len(docs), max_docs)
    it = iter(docs) if max_docs is None else itertools.islice(docs, max_docs)

    stats = {"overall": defaultdict(float), "cluster": defaultdict(lambda: defaultdict(float)),
             "label": defaultdict(lambda: defaultdict(float))}
    doc_rows = []
    n_docs = n_empty = n_windows = n_cut = 0
    budget = int(max_tokens) if max_tokens else None  # tokens still to score in this call
    doc_cap = int(max_doc_tokens) if max_doc_tokens else None
    n_bos = len(bos)
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"perplexity {getattr(model, 'name', '')}", unit="doc", mininterval=2.0)
    while budget is None or budget > 0:
        chunk = list(itertools.islice(it, chunk_docs))
        if not chunk:
            break
        texts = []
        for j, doc in enumerate(chunk):
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                where = doc.get("id", n_docs + j) if isinstance(doc, dict) else n_docs + j
                raise InputError(f"document {where!r} has no string 'text' field")
            text = doc["text"]
            texts.append(text[: 16 * (doc_cap + 1)] if doc_cap and len(text) > 16 * (doc_cap + 1) else text)
        # verbose=False: a document longer than the context is cut into windows below, as intended
        encoded = [list(x) for x in model.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]
        cut = [False] * len(chunk)
        for j, toks in enumerate(encoded):  # the caps, in document order: scored tokens = len(toks) (+ bos − 1)
            cap = doc_cap
            if budget is not None:
                room = max(0, budget + 1 - n_bos)
                cap = room if cap is None else min(cap, room)
            if cap is not None and len(toks) > cap:
                encoded[j], cut[j] = toks[:cap], True
            if budget is not None:
                budget -= max(0, len(encoded[j]) + n_bos - 1)
                if budget <= 0:
                    chunk, encoded, cut = chunk[: j + 1], encoded[: j + 1], cut[: j + 1]
                    break
        windows = []  # (doc index in chunk, ids, prefix text)
        for j, toks in enumerate(encoded):
            ids = bos + toks
            for start, win in document_windows(ids, L):
                prefix = model.tokenizer.decode(ids[len(bos) : start]) if start > len(bos) else ""
                windows.append((j, win, prefix))
        nll = [0.0] * len(chunk)
        ntok = [0] * len(chunk)
        windows.sort(key=lambda w: -len(w[1]))
        rows = max(1, model.pooled_rows(batch_size))
        for b in range(0, len(windows), rows):
            batch = windows[b : b + rows]
            T = len(batch[0][1])
            ids = torch.full((len(batch), T), pad, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T)
            for r, (_, win, _) in enumerate(batch):
                ids[r, : len(win)] = torch.tensor(win, dtype=torch.long)
                mask[r, : len(win)] = 1
            lp = model.token_logprobs(ids, mask, [w[2] for w in batch])
            lp = lp.float().cpu()  # (B, T-1)
            valid = mask[:, 1:].bool()  # (B, T-1) targets that are real tokens
            bad = valid & ~torch.isfinite(lp)  # a NaN or ±inf log-probability of a real token is an error, never a score
            if bool(bad.any()):
                r = int(bad.any(1).nonzero()[0])
                raise InputError(f"model {getattr(model, 'name', '?')} gave a non-finite log-probability "
                                 f"({float(lp[r][bad[r]][0])}) to a token of document {chunk[batch[r][0]].get('id', '?')!r}: "
                                 "its weights are corrupt or its training diverged")
            per_row = -(lp.masked_fill(~valid, 0.0)).double().sum(1)  # (B,)
            for r, (j, win, _) in enumerate(batch):
                nll[j] += float(per_row[r])
                ntok[j] += len(win) - 1
        n_windows += len(windows)
        for j, doc in enumerate(chunk):
            if ntok[j] == 0:
                n_empty += 1
                continue
            if cut[j]:
                n_cut += 1
                n_bytes = len(model.tokenizer.decode(encoded[j]).encode("utf-8"))  # the scored prefix
            else:
                n_bytes = len(doc["text"].encode("utf-8"))
            groups = [stats["overall"]]
            if doc.get("cluster_id") is not None:
                groups.append(stats["cluster"][str(int(doc["cluster_id"]))])
            if doc.get("label") is not None:
                groups.append(stats["label"][str(doc["label"])])
            for g in groups:
                g["nll"] += nll[j]
                g["n_tokens"] += ntok[j]
                g["n_bytes"] += n_bytes
                g["n_docs"] += 1
            if per_doc:
                doc_rows.append({"id": str(doc.get("id", n_docs + j)), "nll": nll[j], "n_tokens": ntok[j]})
        n_docs += len(chunk)
        bar.update(len(chunk))
        g = stats["overall"]
        elapsed = time.perf_counter() - t0
        if g["n_tokens"]:
            bar.set_postfix(ppl=f"{math.exp(g['nll'] / g['n_tokens']):.2f}", tok_s=f"{g['n_tokens'] / elapsed:.0f}")
    bar.close()
    wall = time.perf_counter() - t0
    if n_docs == 0:
        raise InputError("no documents to evaluate perplexity on")
    if n_empty:
        log.warning("perplexity: skipped %d of %d documents with no tokens", n_empty, n_docs)
    left_out = max(0, total - n_docs) if total is not None else None
    if n_cut or left_out:
        log.warning("perplexity: %d document(s) cut to %s tokens, %s left out after %s tokens in total", n_cut,
                    doc_cap, left_out, max_tokens)

    def metrics(g):
        return _group_metrics(g["nll"], int(g["n_tokens"]), int(g["n_bytes"]), int(g["n_docs"]))

    overall = metrics(stats["overall"])
    result = {
        "model": getattr(model, "name", type(model).__name__),
        "perplexity": overall["perplexity"],
        "bits_per_byte": overall["bits_per_byte"],
        "overall": overall,
        "per_cluster": {k: metrics(v) for k, v in sorted(stats["cluster"].items(), key=lambda kv: int(kv[0]))},
        "per_label": {k: metrics(v) for k, v in sorted(stats["label"].items())},
        "n_docs": n_docs - n_empty,
        "n_empty_docs": n_empty,
        "n_tokens": overall["n_tokens"],
        "n_windows": n_windows,
        "max_tokens": int(max_tokens) if max_tokens else None,
        "max_doc_tokens": doc_cap,
        "n_docs_cut": n_cut,
        "n_docs_left_out": left_out,
        "max_length": L,
        "batch_size": batch_size,
        "wall_time_s": round(wall, 3),
        "tokens_per_s": round(overall["n_tokens"] / wall, 1) if wall > 0 else None,
    }
    if per_doc:
        result["docs"] = doc_rows
    log.info("perplexity of %s: %.3f over %d tokens in %d docs (%.1f tok/s)", result["model"],
             overall["perplexity"] or float("nan"), overall["n_tokens"], result["n_docs"], result["tokens_per_s"] or 0)
    if out_path is not None:
        write_json(out_path, result)
    return result


def oracle_perplexity(expert_results: Sequence[dict]) -> dict:
    """Oracle routing, a diagnostic that reads the future: every document scored by the expert of the cluster its
    full text is assigned to. Assembled from the experts' own evaluations on the same documents: cluster c's
    group is expert c's `per_cluster[c]`, and the overall figures pool those groups,

        PPL_oracle = exp( Σ_c NLL_c(expert c) / Σ_c n_tokens_c )

    expert_results[c]: `evaluate_perplexity` result of expert c (with per_cluster groups). Returns the same keys
    as `evaluate_perplexity` (model "oracle"; `per_label` is empty: labels cut across clusters, and the
    per-cluster totals do not say which label each document has; documents without a cluster_id are left out).
    """
    if not expert_results:
        raise InputError("the oracle needs the evaluation of at least one expert")
    def sizes(res):
        return {c: (g["n_tokens"], g["n_docs"]) for c, g in (res.get("per_cluster") or {}).items()}

    first = expert_results[0]
    groups, totals = {}, {"nll": 0.0, "n_tokens": 0, "n_bytes": 0, "n_docs": 0}
    for c, res in enumerate(expert_results):
        if sizes(res) != sizes(first):  # the experts must have scored the same documents
            raise InputError(f"the oracle needs every expert evaluated on the same documents; {first.get('model')} "
                             f"and {res.get('model')} saw different ones")
        g = (res.get("per_cluster") or {}).get(str(c))
        if not g or not g.get("n_tokens"):
            continue  # no document of this split is in cluster c
        nll = g["nll_per_token"] * g["n_tokens"]
        groups[str(c)] = _group_metrics(nll, g["n_tokens"], g["n_bytes"], g["n_docs"])
        for key, value in (("nll", nll), ("n_tokens", g["n_tokens"]), ("n_bytes", g["n_bytes"]), ("n_docs", g["n_docs"])):
            totals[key] += value
    overall = _group_metrics(totals["nll"], totals["n_tokens"], totals["n_bytes"], totals["n_docs"])
    return {
        "model": ORACLE,
        "perplexity": overall["perplexity"],
        "bits_per_byte": overall["bits_per_byte"],
        "overall": overall,
        "per_cluster": groups,
        "per_label": {},
        "n_docs": overall["n_docs"],
        "n_empty_docs": first.get("n_empty_docs", 0),
        "n_tokens": overall["n_tokens"],
        "max_length": first.get("max_length"),
        "experts": [res.get("model") for res in expert_results],
    }

"""Few-shot in-context classification, as in the c-BTM paper (Gururangan et al. 2023, §5: 8-shot, 5 seeds).

For each seed, k demonstrations are drawn from the task's train pool (balanced over labels by default), written
with the task's template, and followed by the test input. The prediction is

    ŷ = argmax_y  s(y),   s(y) = log p(" " + word(y) | prompt)                       (raw)
                          s(y) = log p(" " + word(y) | prompt) / |tokens(word(y))|   (length_norm)
                          s(y) = log p(word(y) | prompt) − log p(word(y) | premise)  (dcpmi)

where `premise` is the template's answer cue alone ("Topic:"), the domain-conditional PMI of Holtzman et al.
2021, "Surface Form Competition". Every model is scored through `experts.scoring.ScoringModel`, so dense,
experts, the c-BTM ensemble, the averaged model and the MoE are evaluated the same way; the prompt
(demonstrations + input) is the context the model sees, so a routing model routes on it.

Files: a task is a folder with `train.jsonl`, `test.jsonl` (`{"text": str, "label": int | str}`), `labels.json`
(ordered label names) and optionally `task.json` (`{"name", "kind", "template": {...}, "verbalizer": [...]}`);
`evaluate_fewshot(..., out_path)` writes one JSON of metrics.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Sequence

import numpy as np
import torch

from corpus.io import InputError, write_json
from tasks.fewshot.build import make_task_from_corpus
from tasks.fewshot.load import Task, load_task, subsample
from tasks.fewshot.prompts import build_prompts, encode, sample_demonstrations

log = logging.getLogger(__name__)

SCORINGS = ("raw", "length_norm", "dcpmi")
DEFAULT_SEEDS = (13, 21, 42, 87, 100)


# ---------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------
def label_token_ids(model, task: Task) -> list[list[int]]:
    """Token ids of `" " + word` for each label word; InputError when a word tokenizes to nothing or two
    words tokenize identically."""
    out = []
    for word in task.verbalizer:
        ids = encode(model, " " + word)
        if not ids or not word.strip():
            raise InputError(f"task {task.name}: label word {word!r} tokenizes to nothing with this model's tokenizer")
        out.append(ids)
    if len({tuple(x) for x in out}) != len(out):
        raise InputError(f"task {task.name}: two label words tokenize to the same tokens: {task.verbalizer}")
    return out


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for r, seq in enumerate(rows):
        ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[r, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _gives_full_distributions(model) -> bool:
    """True when the model overrides `score_tokens` (the base implementation returns no full distributions)."""
    from experts.scoring import ScoringModel

    return getattr(type(model), "score_tokens", None) is not ScoringModel.score_tokens


@torch.no_grad()
def score_labels(
    model,
    prompt_ids: list[list[int]],
    label_ids: list[list[int]],
    batch_size: int = 8,
    single_pass: bool | None = None,
    desc: str = "scoring",
) -> np.ndarray:
    """(n_prompts, n_labels) float64: Σ_t log p(label token t | prompt, earlier label tokens).

    `single_pass=None` picks one forward pass per prompt when every label is one token: all labels are read
    from the one next-token distribution after the prompt (`score_tokens(..., full_at=...)`, or
    `next_token_logprobs` for models whose `score_tokens` gives no full distributions). Otherwise one row per
    (prompt, label) is scored. Both give the same numbers. Scoring starts at the first label token
    (`score_from` = prompt length), so a routing model routes on the whole prompt, once per prompt.
    Prompts are batched longest first to limit padding, `model.pooled_rows(batch_size)` rows per call.
    """
    from tqdm.auto import tqdm

    if single_pass is None:
        single_pass = all(len(x) == 1 for x in label_ids)
    if single_pass and not all(len(x) == 1 for x in label_ids):
        raise ValueError("single_pass scoring needs every label word to be one token")
    n, n_labels = len(prompt_ids), len(label_ids)
    scores = np.zeros((n, n_labels), dtype=np.float64)
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    first = torch.tensor([x[0] for x in label_ids])  # (n_labels,)
    full_ok = _gives_full_distributions(model)
    if single_pass:  # the prompt plus one placeholder target (label 0's token), read out in full
        rows = [(i, None) for i in range(n)]
    else:
        rows = [(i, y) for i in range(n) for y in range(n_labels)]

    def row_ids(r):
        i, y = r
        return prompt_ids[i] + (label_ids[0] if y is None else label_ids[y])

    order = sorted(range(len(rows)), key=lambda j: -len(row_ids(rows[j])))
    bar = tqdm(total=len(rows), desc=desc, unit="row", leave=False, mininterval=2.0)
    step = max(1, model.pooled_rows(batch_size))
    for b in range(0, len(order), step):
        batch = [rows[j] for j in order[b : b + step]]
        seqs = [row_ids(r) for r in batch]
        ids, mask = _pad(seqs, pad, model.device)  # (B, T)
        starts = torch.tensor([len(prompt_ids[i]) for i, _ in batch])  # (B,) first label position
        prefixes = [""] * len(seqs)
        if single_pass:
            full = None
            if full_ok:
                full_at = torch.zeros((len(seqs), ids.shape[1] - 1), dtype=torch.bool)  # (B, T-1)
                full_at[torch.arange(len(seqs)), starts - 1] = True
                _, full = model.score_tokens(ids, mask, prefixes, score_from=starts, full_at=full_at.to(model.device))
            if full is None:  # plain interface: the distribution after the last prompt token
                full_ok = False
                prompt_mask = mask.clone()
                prompt_mask[torch.arange(len(seqs)), starts.to(mask.device)] = 0
                full = model.next_token_logprobs(ids, prompt_mask, prefixes)
            lp = full.float().cpu()  # (B, V)
            for r, (i, _) in enumerate(batch):
                scores[i] = lp[r, first].double().numpy()
        else:
            lp, _ = model.score_tokens(ids, mask, prefixes, score_from=starts.to(model.device))
            lp = lp.float().cpu()  # (B, T-1)
            for r, (i, y) in enumerate(batch):
                n_p, n_c = len(prompt_ids[i]), len(label_ids[y])
                scores[i, y] = float(lp[r, n_p - 1 : n_p - 1 + n_c].double().sum())
        bar.update(len(batch))
    bar.close()
    if not np.isfinite(scores).all():  # a NaN never wins (argmax) nor scores: the model is broken
        i = int(np.nonzero(~np.isfinite(scores).all(1))[0][0])
        raise InputError(f"model {getattr(model, 'name', '?')} gave a non-finite log-probability to a label of prompt "
                         f"{i} ({desc}): its weights are corrupt or its training diverged")
    return scores


def apply_scoring(raw: np.ndarray, label_ids: list[list[int]], premise_scores: np.ndarray | None, scoring: str) -> np.ndarray:
    """raw (n, L) Σ log p → the score the prediction argmaxes: raw, /n_tokens, or − log p(label | premise)."""
    if scoring == "raw":
        return raw
    if scoring == "length_norm":
        return raw / np.array([len(x) for x in label_ids], dtype=np.float64)[None, :]
    if scoring == "dcpmi":
        return raw - premise_scores[None, :]
    raise InputError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------
def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> dict:
    from sklearn.metrics import confusion_matrix, f1_score

    labels = list(range(n_labels))
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),  # rows: true, cols: predicted
    }


def _mean_std(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def baselines(task: Task, y_true: np.ndarray, seeds: Sequence[int]) -> dict:
    """Majority class (the most frequent train label, predicted for every test example) and uniform random
    guessing (accuracy 1/L exactly; macro-F1 averaged over one random draw per seed)."""
    n_labels = len(task.labels)
    counts = np.bincount([ex["label"] for ex in task.train], minlength=n_labels)
    majority = int(counts.argmax())
    maj = classification_metrics(y_true, np.full_like(y_true, majority), n_labels)
    f1s = [classification_metrics(y_true, np.random.default_rng(s).integers(0, n_labels, len(y_true)), n_labels)["macro_f1"]
           for s in seeds]
    return {
        "majority": {"label": task.labels[majority], "accuracy": maj["accuracy"], "macro_f1": maj["macro_f1"]},
        "random": {"accuracy": 1.0 / n_labels, "macro_f1": float(np.mean(f1s))},
    }


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------
def _routing_summary(weights) -> dict:
    w = np.asarray(weights, dtype=np.float64)  # (n, n_experts)
    top = np.bincount(w.argmax(1), minlength=w.shape[1]) if len(w) else np.zeros(w.shape[1], int)
    return {"mean_weights": w.mean(0).round(6).tolist(), "top_expert_share": (top / max(len(w), 1)).round(6).tolist(),
            "n_texts": int(len(w))}


def evaluate_fewshot(
    model,
    task: Task | str,
    shots: int = 8,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    max_test: int | None = None,
    scoring: str = "raw",
    balanced: bool = True,
    batch_size: int = 8,
    out_path: str | os.PathLike | None = None,
    task_routing: bool = False,
    routing_sample: int = 256,
    add_bos: bool = True,
    single_pass: bool | None = None,
) -> dict:
    """k-shot in-context classification of `task` with `model` (a `ScoringModel`) for each seed.

    Returns (and writes to `out_path` atomically, when given) a dict with: task, model, kind, labels,
    verbalizer, template, shots, seeds, scoring, balanced, n_test, single_pass, `per_seed` (accuracy,
    macro_f1, confusion, prediction counts, truncation counts and the other two scorings' accuracy/F1 for free),
    `accuracy` and `macro_f1` as {mean, std (ddof=1)} over seeds, `by_scoring` (mean ± std for raw,
    length_norm and dcpmi), `baselines` (majority, random), `routing` (when the model has
    `routing_weights(texts) -> (n, n_experts)`), wall_time_s and prompts_per_s.

    `task_routing=True` asks the model for one routing weight vector per task, estimated from up to
    `routing_sample` train texts, through the optional hooks `set_fixed_routing(texts)` /
    `clear_fixed_routing()` (skipped with a warning when the model lacks them).
    """
    if isinstance(task, (str, os.PathLike)):
        task = load_task(task)
    if scoring not in SCORINGS:
        raise InputError(f"unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}")
    if shots < 0:
        raise InputError(f"shots must be ≥ 0, got {shots}")
    if not seeds:
        raise InputError("no few-shot seeds given")
    test = subsample(task.test, max_test) if max_test is not None else list(task.test)
    if not test:
        raise InputError(f"task {task.name}: the test set is empty")
    if not task.train and shots > 0:
        raise InputError(f"task {task.name}: the train pool is empty")
    if shots > len(task.train):
        raise InputError(f"task {task.name}: train pool has {len(task.train)} examples, fewer than shots={shots}")
    label_ids = label_token_ids(model, task)
    max_label = max(len(x) for x in label_ids)
    budget = int(model.max_length) - max_label
    if budget < 2:
        raise InputError(f"model context ({model.max_length} tokens) too short for the label words of {task.name}")
    y_true = np.array([ex["label"] for ex in test])
    t0 = time.perf_counter()
    routing: dict = {}
    fixed = False
    if task_routing:
        if hasattr(model, "set_fixed_routing") and hasattr(model, "clear_fixed_routing"):
            texts = [ex["text"] for ex in subsample(task.train, routing_sample)]
            model.set_fixed_routing(texts)
            fixed = True
            routing["mode"] = "task"
            if hasattr(model, "routing_weights"):
                routing["task"] = _routing_summary(model.routing_weights(texts))
        else:
            log.warning("task_routing=True but model %s has no set_fixed_routing(); routing per prompt instead",
                        getattr(model, "name", "?"))
            routing["mode"] = "prompt (task routing unsupported by the model)"
    else:
        routing["mode"] = "prompt"
    try:
        bos = model.bos_ids() if add_bos else []
        premise = task.template.domain_premise()
        premise_ids = [bos + encode(model, premise)]
        premise_scores = score_labels(model, premise_ids, label_ids, batch_size, single_pass, desc="premise")[0]
        per_seed, n_rows = [], 0
        seed_weights = []
        for seed in seeds:
            ts = time.perf_counter()
            prompts = build_prompts(model, task, test, shots, seed, balanced, budget, add_bos)
            raw = score_labels(model, prompts.ids, label_ids, batch_size, single_pass,
                               desc=f"{task.name} seed {seed}")
            n_rows += len(prompts.ids)
            entry = {"seed": int(seed)}
            for name in SCORINGS:
                pred = apply_scoring(raw, label_ids, premise_scores, name).argmax(1)
                m = classification_metrics(y_true, pred, len(task.labels))
                if name == scoring:
                    entry.update(m)
                    entry["prediction_counts"] = np.bincount(pred, minlength=len(task.labels)).tolist()
                entry.setdefault("by_scoring", {})[name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
            entry.update({
                "n_truncated_prompts": prompts.n_truncated,
                "n_demos_dropped": prompts.n_demos_dropped,
                "mean_demos": float(np.mean(prompts.n_demos)),
                "mean_prompt_tokens": float(np.mean([len(x) for x in prompts.ids])),
                "wall_time_s": round(time.perf_counter() - ts, 3),
            })
            if hasattr(model, "routing_weights") and not fixed:
                sample = subsample(list(range(len(prompts.texts))), routing_sample, seed)
                w = np.asarray(model.routing_weights([prompts.texts[i] for i in sample]))
                seed_weights.append(w)
                entry["routing"] = _routing_summary(w)
            per_seed.append(entry)
            log.info("%s seed %d: accuracy %.4f macro-F1 %.4f (%s, %.1fs)", task.name, seed, entry["accuracy"],
                     entry["macro_f1"], scoring, entry["wall_time_s"])
        if seed_weights:
            routing["prompt"] = _routing_summary(np.concatenate(seed_weights))
    finally:
        if fixed:
            model.clear_fixed_routing()
    wall = time.perf_counter() - t0
    result = {
        "task": task.name,
        "model": getattr(model, "name", type(model).__name__),
        "kind": task.kind,
        "labels": task.labels,
        "verbalizer": task.verbalizer,
        "template": task.template.to_dict(),
        "premise": premise,
        "shots": shots,
        "seeds": [int(s) for s in seeds],
        "scoring": scoring,
        "balanced": balanced,
        "n_test": len(test),
        "n_train_pool": len(task.train),
        "single_pass": all(len(x) == 1 for x in label_ids) if single_pass is None else bool(single_pass),
        "accuracy": _mean_std([e["accuracy"] for e in per_seed]),
        "macro_f1": _mean_std([e["macro_f1"] for e in per_seed]),
        "by_scoring": {
            name: {k: _mean_std([e["by_scoring"][name][k] for e in per_seed]) for k in ("accuracy", "macro_f1")}
            for name in SCORINGS
        },
        "baselines": baselines(task, y_true, seeds),
        "per_seed": per_seed,
        "routing": routing,
        "n_truncated_prompts": int(sum(e["n_truncated_prompts"] for e in per_seed)),
        "wall_time_s": round(wall, 3),
        "prompts_per_s": round(n_rows / wall, 2) if wall > 0 else None,
    }
    log.info("%s on %s: accuracy %.4f ± %.4f over %d seeds (%s; majority %.4f) in %.1fs", result["model"], task.name,
             result["accuracy"]["mean"], result["accuracy"]["std"], len(seeds), scoring,
             result["baselines"]["majority"]["accuracy"], wall)
    if out_path is not None:
        write_json(out_path, result)
    return result

"""`evaluate_fewshot`: k-shot in-context classification of a task by a model, over seeds.

For each seed, k demonstrations are drawn from the task's train pool (balanced over labels by default), written
with the task's template, and followed by the test input (`prompts`); the prediction is the label word scored
highest (`scoring`). The prompt (demonstrations + input) is the context the model sees, so a routing model routes
on it. `evaluate_fewshot(..., out_path)` writes one JSON of metrics.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Sequence

import numpy as np

from corpus.io import InputError, write_json
from tasks.fewshot.load import Task, load_task, subsample
from tasks.fewshot.metrics import baselines, classification_metrics
from tasks.fewshot.prompts import build_prompts, encode, shots_that_fit
from tasks.fewshot.scoring import SCORINGS, apply_scoring, label_token_ids, score_labels

log = logging.getLogger(__name__)

DEFAULT_SEEDS = (13, 21, 42, 87, 100)


def _mean_std(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


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
    fit_shots: bool = True,
) -> dict:
    """k-shot in-context classification of `task` with `model` (a `ScoringModel`) for each seed.

    Returns (and writes to `out_path` atomically, when given) a dict with: task, model, kind, labels,
    verbalizer, template, shots (used), shots_asked, seeds, scoring, balanced, n_test, single_pass, `per_seed` (accuracy,
    macro_f1, confusion, prediction counts, truncation counts and the other two scorings' accuracy/F1 for free),
    `accuracy` and `macro_f1` as {mean, std (ddof=1)} over seeds, `by_scoring` (mean ± std for raw,
    length_norm and dcpmi), `baselines` (majority, random), `routing` (when the model has
    `routing_weights(texts) -> (n, n_experts)`), wall_time_s and prompts_per_s.

    `fit_shots=True` lowers `shots` to the demonstrations a typical prompt holds in the model's context
    (`prompts.shots_that_fit`; `shots_asked` keeps the request), so that prompts are not cut and every seed shows
    the same number of demonstrations; prompts still longer than the context drop demonstrations from the front.

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
    shots_asked = shots
    if fit_shots:
        shots = shots_that_fit(model, task, test, shots, budget, add_bos)
        if shots < shots_asked:
            log.info("%s: %d of the %d shots asked fit the %d-token context of %s", task.name, shots, shots_asked,
                     model.max_length, getattr(model, "name", "the model"))
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
        "shots_asked": shots_asked,
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

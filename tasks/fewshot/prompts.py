"""Prompts: each seed's demonstrations drawn from the task's train pool, the prompt text the task's template
writes (demonstrations, then the test input ending with the answer cue), and its token ids fitted to the model's
context."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from corpus.io import InputError
from tasks.fewshot.load import Task

log = logging.getLogger(__name__)


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def sample_demonstrations(task: Task, shots: int, seed: int, balanced: bool = True) -> list[int]:
    """Indices into `task.train` of `shots` demonstrations for this seed, in prompt order.

    Balanced: ⌊k/L⌋ per label, the remainder spread over labels picked at random (a label with too few
    examples is topped up from the others); random: k examples drawn uniformly. Deterministic in `seed`.
    """
    n = len(task.train)
    if shots == 0:
        return []
    if n == 0:
        raise InputError(f"task {task.name}: the train pool is empty")
    if shots > n:
        raise InputError(f"task {task.name}: train pool has {n} examples, fewer than shots={shots}")
    rng = random.Random(seed)
    if not balanced:
        idx = rng.sample(range(n), shots)
        rng.shuffle(idx)
        return idx
    n_labels = len(task.labels)
    pools = [[] for _ in range(n_labels)]
    for i, ex in enumerate(task.train):
        pools[ex["label"]].append(i)
    quota = [shots // n_labels] * n_labels
    for y in rng.sample(range(n_labels), shots % n_labels):
        quota[y] += 1
    picked: list[int] = []
    for y in range(n_labels):
        picked += rng.sample(pools[y], min(quota[y], len(pools[y])))
    if len(picked) < shots:  # some label ran short: top up from the rest of the pool
        taken = set(picked)
        picked += rng.sample([i for i in range(n) if i not in taken], shots - len(picked))
    rng.shuffle(picked)
    return picked


def demonstrations_for(task: Task, demos: list[int], test_text: str, seed: int, test_index: int) -> list[int]:
    """The seed's demonstrations for one test example: any demo whose text equals the test text is replaced
    by another train example (same label when possible) chosen with `(seed, test_index)`."""
    target = _norm(test_text)
    if all(_norm(task.train[i]["text"]) != target for i in demos):
        return demos
    rng = random.Random(f"{seed}:{test_index}")
    out, used = list(demos), set(demos)
    for pos, i in enumerate(out):
        if _norm(task.train[i]["text"]) != target:
            continue
        label = task.train[i]["label"]
        cands = [j for j, ex in enumerate(task.train)
                 if j not in used and _norm(ex["text"]) != target and ex["label"] == label]
        if not cands:
            cands = [j for j, ex in enumerate(task.train) if j not in used and _norm(ex["text"]) != target]
        if not cands:
            raise InputError(f"task {task.name}: no train example differs from test example {test_index}")
        j = rng.choice(cands)
        out[pos] = j
        used.add(j)
    return out


def format_prompt(task: Task, demos: Sequence[int], text: str) -> str:
    """instruction + demo_1 + sep + ... + demo_k + sep + query (the query ends with the answer cue)."""
    t = task.template
    parts = [t.format_demo(task.train[i]["text"], task.verbalizer[task.train[i]["label"]]) for i in demos]
    parts.append(t.format_input(text))
    return t.instruction + t.sep.join(parts)


def encode(model, text: str) -> list[int]:
    """Token ids of `text` by `model.tokenizer`, without special tokens."""
    return list(model.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])  # fitted below


def _encode_batch(model, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in model.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def shots_that_fit(model, task: Task, test: list[dict], shots: int, budget: int, add_bos: bool = True,
                   sample: int = 64) -> int:
    """The most demonstrations (at most `shots`) that a typical prompt holds within `budget` tokens: the
    instruction, n demonstrations of the median length (template and separator included) and a test input of the
    90th-percentile length. Measured on a seeded sample of `sample` train and test examples."""
    from tasks.fewshot.load import subsample

    if shots <= 0 or not task.train or not test:
        return max(0, shots)
    t = task.template
    demos = subsample(task.train, sample)
    demo_len = np.median([len(x) for x in _encode_batch(
        model, [t.format_demo(ex["text"], task.verbalizer[ex["label"]]) + t.sep for ex in demos])])
    query_len = np.percentile([len(x) for x in _encode_batch(
        model, [t.instruction + t.format_input(ex["text"]) for ex in subsample(test, sample)])], 90)
    room = budget - (len(model.bos_ids()) if add_bos else 0) - query_len
    return int(max(0, min(shots, room // max(demo_len, 1))))


@dataclass
class PromptSet:
    """Token ids of every test example's prompt for one seed (BOS first), fitted to the model context."""

    ids: list[list[int]]
    texts: list[str]
    n_demos: list[int]  # demonstrations kept per prompt
    n_truncated: int  # prompts that lost demonstrations (or, rarely, the start of the input)
    n_demos_dropped: int


def build_prompts(model, task: Task, test: list[dict], shots: int, seed: int, balanced: bool,
                  budget: int, add_bos: bool = True) -> PromptSet:
    """Prompts for one seed. A prompt longer than `budget` tokens drops demonstrations from the front; with
    none left, the start of the prompt is cut (left truncation)."""
    demos = sample_demonstrations(task, shots, seed, balanced)
    bos = model.bos_ids() if add_bos else []
    budget = budget - len(bos)
    per_test = [demonstrations_for(task, demos, ex["text"], seed, i) for i, ex in enumerate(test)]
    texts = [format_prompt(task, d, ex["text"]) for d, ex in zip(per_test, test)]
    enc = _encode_batch(model, texts)
    n_trunc = n_dropped = 0
    n_demos = [len(d) for d in per_test]
    for i, ids in enumerate(enc):
        if len(ids) <= budget:
            continue
        n_trunc += 1
        d = per_test[i]
        while len(ids) > budget and d:
            d = d[1:]
            n_dropped += 1
            texts[i] = format_prompt(task, d, test[i]["text"])
            ids = encode(model, texts[i])
        if len(ids) > budget:
            ids = ids[-budget:]
        enc[i] = ids
        n_demos[i] = len(d)
    if n_trunc:
        log.warning("task %s seed %d: %d of %d prompts longer than the context (%d tokens): dropped %d "
                    "demonstrations from the front", task.name, seed, n_trunc, len(test), budget + len(bos), n_dropped)
    return PromptSet([bos + ids for ids in enc], texts, n_demos, n_trunc, n_dropped)

"""Scoring label words: the log-probability each model gives each label word after each prompt, and the score
the prediction argmaxes,

    ŷ = argmax_y  s(y),   s(y) = log p(" " + word(y) | prompt)                       (raw)
                          s(y) = log p(" " + word(y) | prompt) / |tokens(word(y))|   (length_norm)
                          s(y) = log p(word(y) | prompt) − log p(word(y) | premise)  (dcpmi)

where `premise` is the template's answer cue alone ("Topic:"), the domain-conditional PMI of Holtzman et al.
2021, "Surface Form Competition". Every model is scored through `experts.scoring.ScoringModel`.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from corpus.io import InputError
from experts.scoring import ScoringModel
from tasks.fewshot.load import Task
from tasks.fewshot.prompts import encode

SCORINGS = ("raw", "length_norm", "dcpmi")


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

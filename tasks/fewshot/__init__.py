"""Few-shot in-context classification, as in the c-BTM paper (Gururangan et al. 2023, §5: 8-shot, 5 seeds).

For each seed, k demonstrations are drawn from the task's train pool (balanced over labels by default), written
with the task's template, and followed by the test input; the prediction is the label word the model scores
highest after the prompt: raw, length-normalised, or the domain-conditional PMI of Holtzman et al. 2021. Every
model is scored through `experts.scoring.ScoringModel`, so dense, experts, the c-BTM ensemble, the averaged model
and the MoE are evaluated the same way; the prompt is the context the model sees, so a routing model routes on it.

Modules:
- `load`: the `Task` record; `load_task` reads a task folder (`train.jsonl`, `test.jsonl`, `labels.json`,
  optionally `task.json`), a task folder by name, or a hub dataset (`hf:<dataset>`).
- `build`: `make_task_from_corpus` writes a domain-classification task folder from a prepared corpus.
- `prompts`: each seed's demonstrations, the prompt text, and its token ids fitted to the model's context.
- `scoring`: `score_labels`, the label words' log-probabilities after each prompt, and the scorings (`SCORINGS`).
- `metrics`: accuracy, macro-F1, confusion matrix, majority and random baselines.
- `evaluate`: `evaluate_fewshot`, all of the above over seeds, written as one JSON of metrics.
"""
from tasks.fewshot.build import make_task_from_corpus
from tasks.fewshot.evaluate import DEFAULT_SEEDS, evaluate_fewshot
from tasks.fewshot.load import Task, load_task
from tasks.fewshot.prompts import build_prompts, sample_demonstrations
from tasks.fewshot.scoring import SCORINGS, label_token_ids, score_labels

__all__ = [
    "DEFAULT_SEEDS", "SCORINGS", "Task", "build_prompts", "evaluate_fewshot", "label_token_ids", "load_task",
    "make_task_from_corpus", "sample_demonstrations", "score_labels",
]

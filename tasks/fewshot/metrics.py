"""Classification metrics of the predictions (accuracy, macro-F1, confusion) and the majority / random baselines."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from tasks.fewshot.load import Task


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> dict:
    """Accuracy, macro-F1 and confusion matrix of the label indices `y_pred` against `y_true` (labels 0..n_labels-1)."""
    # slow to import (it loads scipy), and only scoring needs it, not loading a task (the pipeline's preflight)
    from sklearn.metrics import confusion_matrix, f1_score

    labels = list(range(n_labels))
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),  # rows: true, cols: predicted
    }


def baselines(task: Task, y_true: np.ndarray, seeds: Sequence[int]) -> dict:
    """Majority class (the most frequent label of the evaluated examples `y_true`, predicted for every one of
    them: the best constant answer, never below chance) and uniform random guessing (accuracy 1/L exactly;
    macro-F1 averaged over one random draw per seed)."""
    n_labels = len(task.labels)
    counts = np.bincount(np.asarray(y_true, dtype=np.int64), minlength=n_labels)
    majority = int(counts.argmax())
    maj = classification_metrics(y_true, np.full_like(y_true, majority), n_labels)
    f1s = [classification_metrics(y_true, np.random.default_rng(s).integers(0, n_labels, len(y_true)), n_labels)["macro_f1"]
           for s in seeds]
    return {
        "majority": {"label": task.labels[majority], "accuracy": maj["accuracy"], "macro_f1": maj["macro_f1"]},
        "random": {"accuracy": 1.0 / n_labels, "macro_f1": float(np.mean(f1s))},
    }

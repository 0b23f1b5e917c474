"""Evaluation tasks: perplexity and few-shot in-context classification. No Luigi in here.

- `tasks.perplexity.evaluate_perplexity(model, docs, out_path)`: token-level perplexity (and bits/byte)
  overall, per cluster_id and per label.
- `tasks.fewshot.load_task(path_or_name)`, `evaluate_fewshot(model, task, shots, seeds, ...)`,
  `make_task_from_corpus(corpus_dir, out_dir, label_field)`: k-shot in-context classification.
- `tasks.builtin`: prompt templates and verbalizers of the built-in tasks.
- `tasks.report`: the run report.

Every model is used only through `experts.scoring.ScoringModel`.
"""

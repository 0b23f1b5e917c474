"""Evaluation tasks: perplexity, few-shot in-context classification, the reports. No Luigi in here.

The public API, by module (import from the module; this package itself imports nothing, see below):
- `tasks.perplexity`: `evaluate_perplexity(model, docs, out_path)`, token-level perplexity (and bits/byte) overall,
  per cluster_id and per label; `oracle_perplexity(expert_results)`, oracle routing from the experts' results.
- `tasks.fewshot` (a package; its `__all__` lists its public names): `load_task(path_or_name)`,
  `make_task_from_corpus(corpus_dir, out_dir, label_field)`, `evaluate_fewshot(model, task, shots, seeds, ...)`:
  k-shot in-context classification.
- `tasks.builtin`: prompt templates and verbalizers of the built-in tasks.
- `tasks.report`: `write_report(out_dir, ...)`, `render_markdown(report)`: the run report.
- `tasks.study`: `write_study(out_dir, points, grid)`: the report of a Study's grid of runs.
- `tasks.lm_eval_model`: every model of a run as the lm-evaluation-harness model `cbtm` (importing it registers it).

Every model is used only through `experts.scoring.ScoringModel`. Nothing is re-exported here, so that importing
`tasks.report` or `tasks.study` (which need no torch) stays light, and `cbtm` is registered with lm-eval only where
`tasks.lm_eval_model` is imported.
"""

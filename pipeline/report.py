"""The report stage and `RunAll`, the wrapper that runs every stage of c-BTM for one corpus."""
from __future__ import annotations

import re
from pathlib import Path

import luigi

from corpus.io import atomic_file, read_json
from pipeline.base import RunParams, Stage, install_log_filter
from pipeline.clustering import DescribeClusters
from pipeline.corpus import PrepareCorpus
from pipeline.evaluation import EvaluateFewShot, EvaluatePerplexity, task_slug
from pipeline.models import model_names, model_stage, perplexity_names

TRAINED = ("seed", "dense", "moe")  # models with a training.json (plus every expert_*)


class Report(Stage):
    """`tasks.report.write_report` → `report-<h>/report.{json,md}` + figures; copied to `<run_dir>/report.{json,md}`."""

    folder = "report"

    def requires(self):
        names = model_names(self)
        return {
            "corpus": self.clone(PrepareCorpus),
            "clusters": self.clone(DescribeClusters),
            "perplexity": {m: self.clone(EvaluatePerplexity, model=m) for m in perplexity_names(self)},
            "fewshot": {t: {m: self.clone(EvaluateFewShot, task=t, model=m) for m in self.fewshot_model_names(names)}
                        for t in self.task_list},
            "trained": {m: model_stage(self, m)[0] for m in names if m in TRAINED or m.startswith("expert_")},
        }

    def build(self, out: Path) -> dict:
        from experts.train import compute_budget
        from tasks.report import write_report

        r = self.requires()
        corpus_stats = read_json(self.input_path(r["corpus"]) / "stats.json")
        describe = r["clusters"]
        cluster_info = dict(read_json(describe.stamp_path()).get("result") or {})
        cluster_info["out_dir"] = str(self.input_path(describe))
        run_info = {
            "run_dir": str(self.run_dir),
            "params": {name: getattr(self, name) for name, _ in _run_params()},
            "corpus": {"source": self.corpus, "n_docs": corpus_stats.get("n_docs"), "label_field": self.label,
                       "n_empty_dropped": corpus_stats.get("n_empty_dropped")},
            "models": model_names(self),
        }
        perplexity = {m: read_json(self.input_path(t)) for m, t in r["perplexity"].items()}
        fewshot = {task_slug(t): {m: read_json(self.input_path(s)) for m, s in by_model.items()}
                   for t, by_model in r["fewshot"].items()}
        budgets = {"plan": compute_budget(self.train_tokens, self.seed_fraction, self.num_clusters),
                   "models": {m: _training_json(self.input_path(t)) for m, t in r["trained"].items()}}
        write_report(out, run_info, cluster_info, perplexity, fewshot, budgets, self.timings())
        # the run folder's copy: figure links point into this stage's folder
        md = (out / "report.md").read_text(encoding="utf-8")
        md = re.sub(r"\]\(figures/", f"]({self.out_path().name}/figures/", md)
        with atomic_file(Path(self.run_dir) / "report.md") as f:
            f.write(md)
        with atomic_file(Path(self.run_dir) / "report.json") as f:
            f.write((out / "report.json").read_text(encoding="utf-8"))
        return {"models": len(perplexity), "fewshot_tasks": list(fewshot)}

    def timings(self) -> dict:
        """Wall time per stage family, summed over the stamps of every stage this report depends on."""
        seen, out, todo = set(), {}, list(self._inputs())
        while todo:
            t = todo.pop()
            if t.task_id in seen:
                continue
            seen.add(t.task_id)
            todo.extend(t._inputs())
            try:
                wall = read_json(t.stamp_path()).get("wall_time_s") or 0.0
            except Exception:  # noqa: BLE001 - a missing stamp just has no time
                continue
            entry = out.setdefault(t.task_family, {"runs": 0, "wall_time_s": 0.0})
            entry["runs"] += 1
            entry["wall_time_s"] = round(entry["wall_time_s"] + wall, 3)
        return out


def _run_params():
    return [(name, p) for name, p in RunAll.get_params()]


def _training_json(path: Path) -> dict:
    f = Path(path) / "training.json"
    return read_json(f) if f.is_file() else {}


class RunAll(RunParams, luigi.WrapperTask):
    """Everything: corpus → clusters → seed → experts + dense → merges → evaluations → report.

    `luigi --module pipeline RunAll --local-scheduler` runs the built-in demo with the defaults of luigi.cfg.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install_log_filter()
        self.validate()

    def requires(self):
        return self.clone(Report)

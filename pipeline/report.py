"""The report stage and `RunAll`, the wrapper that runs every stage of c-BTM for one corpus."""
from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import luigi

from corpus.io import atomic_file, read_json
from corpus.layout import MERGE_INFO, MOE_INFO, REPORT_JSON, REPORT_MD, TRAINING_INFO
from experts.merging import PARAMETER_MERGES
from experts.run_models import has_training
from pipeline.failures import install_log_filter, upstream
from pipeline.params import DEFAULT_MERGE_METHODS, RunParams
from pipeline.stage import Stage, check_force_stage
from pipeline.clustering import DescribeClusters
from pipeline.corpus import PrepareCorpus
from pipeline.evaluation import EvaluateFewShot, EvaluatePerplexity, task_slug
from pipeline.merging import MergeExperts
from pipeline.models import model_names, model_stage, perplexity_names

class Report(Stage, RunParams):
    """`tasks.report.write_report` → `report-<h>/report.{json,md}` + figures; `RunAll` publishes them to
    `<run_dir>/report.{json,md}` (a Study's points are not published)."""

    folder = "report"

    def validate(self) -> None:
        super().validate()
        self.fewshot_model_names(model_names(self))  # --fewshot-models names models of this run

    def requires(self):
        names = model_names(self)
        return {
            "corpus": self.clone(PrepareCorpus),
            "clusters": self.clone(DescribeClusters),
            "perplexity": {m: self.clone(EvaluatePerplexity, model=m) for m in perplexity_names(self)},
            "fewshot": {t: {m: self.clone(EvaluateFewShot, task=t, model=m) for m in self.fewshot_model_names(names)}
                        for t in self.task_list},
            "trained": {m: model_stage(self, m)[0] for m in names if has_training(m)},
            "merges": {m: model_stage(self, m)[0] for m in names if m in PARAMETER_MERGES},
            "moe_build": [self.clone(MergeExperts, method="moe")] if "moe" in names else [],
        }

    def build(self, out: Path) -> dict:
        from pipeline.training import TrainExpert
        from tasks.report import write_report

        r = self.requires()
        corpus_stats = read_json(self.input_path(r["corpus"]) / "stats.json")
        describe = r["clusters"]
        cluster_info = dict(read_json(describe.stamp_path()).get("result") or {})
        cluster_info["out_dir"] = str(self.input_path(describe))
        run_info = {
            "run_dir": str(self.run_dir),
            "params": {name: getattr(self, name) for name in run_param_names()},
            "corpus": {"source": self.corpus, "n_docs": corpus_stats.get("n_docs"), "label_field": self.label,
                       "n_empty_dropped": corpus_stats.get("n_empty_dropped")},
            "models": model_names(self),
            "folders": {m: os.path.relpath(self.input_path(model_stage(self, m)[0]), self.run_dir)
                        for m in model_names(self)},
        }
        skipped = self.moe_unsupported() if self.merge_methods == DEFAULT_MERGE_METHODS else None
        if skipped:
            run_info["skipped"] = {"moe": skipped}
        perplexity = {m: read_json(self.input_path(t)) for m, t in r["perplexity"].items()}
        failed = {m: p["failed"] for m, p in perplexity.items() if p.get("failed")}  # merges whose method failed
        perplexity = {m: p for m, p in perplexity.items() if m not in failed}
        fewshot = {task_slug(t): {m: read_json(self.input_path(s)) for m, s in by_model.items() if m not in failed}
                   for t, by_model in r["fewshot"].items()}
        budgets = {"plan": self.clone(TrainExpert, cluster_id=0).budget_plan(),
                   "models": {m: _training_json(self.input_path(t)) for m, t in r["trained"].items()
                              if m not in failed}}
        merges = {"parameter": {m: _json(self.input_path(t) / MERGE_INFO) for m, t in r["merges"].items()
                                if m not in failed}, "failed": failed}
        if r["moe_build"] and "moe" not in failed:
            finetuned = self.input_path(r["trained"]["moe"])
            merges["moe"] = {"build": _json(self.input_path(r["moe_build"][0]) / MOE_INFO),
                             "routing": _json(finetuned / "routing.json"), "training": _training_json(finetuned)}
        write_report(out, run_info, cluster_info, perplexity, fewshot, budgets, self.timings(), merges)
        return {"models": len(perplexity), "fewshot_tasks": list(fewshot)}

    def timings(self) -> dict:
        """Wall time per stage family, summed over the stamps of every stage this report depends on."""
        out = {}
        for t in upstream(self._inputs()):
            try:
                wall = read_json(t.stamp_path()).get("wall_time_s") or 0.0
            except Exception:  # noqa: BLE001 - a missing stamp just has no time
                continue
            entry = out.setdefault(t.task_family, {"runs": 0, "wall_time_s": 0.0})
            entry["runs"] += 1
            entry["wall_time_s"] = round(entry["wall_time_s"] + wall, 3)
        return out


def run_param_names() -> list[str]:
    """The parameters of `RunAll` (what a published report and a Study's shared settings list)."""
    return [name for name, _ in RunAll.get_params()]


def _training_json(path: Path) -> dict:
    return _json(Path(path) / TRAINING_INFO)


def _json(f: Path) -> dict:
    return read_json(f) if Path(f).is_file() else {}


class RunAll(RunParams, luigi.WrapperTask):
    """Everything: corpus → clusters → seed → experts + dense → merges → evaluations → report and model cards.

    `luigi --module pipeline RunAll --local-scheduler` runs the built-in demo with the default parameters.
    When the report is done, `<run_dir>/report.{json,md}` is this RunAll's (`publish_report`), also when
    every stage was already complete: the run folder's report always describes the last completed RunAll.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install_log_filter()
        self.validate()
        from pipeline.preflight import claim_for_command_line

        claim_for_command_line(self)  # lock the run folder, clean what killed runs left, check the disk

    def validate(self) -> None:
        super().validate()
        check_force_stage(self.force_stage)
        self.fewshot_model_names(model_names(self))  # --fewshot-models names models of this run

    def requires(self):
        from pipeline.cards import WriteModelCards

        return [self.clone(Report), self.clone(WriteModelCards)]

    def complete(self) -> bool:
        return super().complete() and published_report(self) == _publication_key(self)

    def run(self) -> None:
        from pipeline.gc import record_completed_run

        publish_report(self)
        record_completed_run(self.run_dir, self.requires())  # what `python -m pipeline.gc` keeps


def _publication_key(run: RunParams) -> dict:
    """What the run folder's report must say to be this RunAll's: the Report stage's folder and run id, and
    the parameters (the execution ones too: the report lists them)."""
    report = run.clone(Report)
    return {"report": report.out_path().name, "report_run_id": report.run_id(),
            "params": json.loads(json.dumps({name: getattr(run, name) for name in run_param_names()}, default=str))}


def published_report(run: RunParams) -> dict | None:
    """The publication key of `<run_dir>/report.json` (None when missing, unreadable or unpublished)."""
    try:
        info = json.loads((Path(run.run_dir) / REPORT_JSON).read_text(encoding="utf-8"))["run"]
        if not (Path(run.run_dir) / REPORT_MD).is_file():
            return None
        return {"report": info["published"]["report"], "report_run_id": info["published"]["report_run_id"],
                "params": info["params"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def publish_report(run: RunParams) -> None:
    """Copy `report-<h>/report.{json,md}` to `<run_dir>/`, saying which run it is: this RunAll's parameters,
    the Report stage's folder and run id, and when it was published (figure links point into report-<h>/)."""
    from tasks.report import render_markdown

    key = _publication_key(run)
    src = run.clone(Report).out_path()
    report = json.loads((src / REPORT_JSON).read_text(encoding="utf-8"))
    stamp = read_json(run.clone(Report).stamp_path())
    report["run"]["run_dir"] = str(run.run_dir)
    report["run"]["params"] = key["params"]
    report["run"]["published"] = {"report": key["report"], "report_run_id": key["report_run_id"],
                                  "report_written": stamp.get("started"), "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                  "host": socket.gethostname(), "pid": os.getpid()}
    md = render_markdown(report)
    md = re.sub(r"\]\(figures/", f"]({src.name}/figures/", md)
    title, _, rest = md.partition("\n")
    md = (f"{title}\n\nThe last completed `RunAll` in this folder, published {report['run']['published']['at']}: "
          f"results of `{key['report']}/` (report run id `{key['report_run_id']}`, written "
          f"{report['run']['published']['report_written']}).\n{rest}")
    with atomic_file(Path(run.run_dir) / REPORT_MD) as f:
        f.write(md)
    with atomic_file(Path(run.run_dir) / REPORT_JSON) as f:  # last: report.json says which run is published
        json.dump(report, f, indent=2)
        f.write("\n")

"""Evaluation stages: perplexity of every model on valid/test (overall, per cluster, per label), and few-shot
in-context classification (`EvaluateFewShot(task, model)`)."""
from __future__ import annotations

import re
from pathlib import Path

import luigi

from corpus.io import write_json
from experts.run_models import ORACLE, expert_name, load_model
from pipeline.merging import FinetuneMoE, MergeExperts, TrainDenseMoECompute, merge_failure
from pipeline.params import (EVAL_MAX_DOC_TOKENS, EVAL_MAX_TOKENS, FewShotParams, ModelsParams, PerplexityParams,
                             carries)
from pipeline.stage import Stage
from pipeline.stamps import files_fingerprint
from pipeline.clustering import AssignClusters
from pipeline.corpus import PrepareCorpus
from pipeline.training import TrainDense, TrainExpert, TrainSeed
from pipeline.models import model_stage


@carries(PrepareCorpus, AssignClusters, TrainSeed, TrainDense, TrainExpert, MergeExperts, FinetuneMoE,
         TrainDenseMoECompute)
class _EvaluateModel(Stage, ModelsParams):
    """Shared wiring of evaluations: one `model` of the run, one JSON file `<model>.json` under `eval-<h>/`."""

    folder = "eval"
    gpu_stage = True
    model = luigi.Parameter(description="the evaluated model: seed, dense, expert_003, ensemble_top2, posterior, "
                            "a parameter merge or moe (pipeline.models)")

    @property
    def output_file(self) -> str:
        return f"{self.model}.json"

    def failure(self) -> dict | None:
        """The failure recorded in place of the evaluated model (a merge whose method failed), or None."""
        return merge_failure(self.input_path(model_stage(self, self.model)[0])) if self.model != ORACLE else None

    def write_failure(self, out: Path, failed: dict) -> dict:
        """The evaluation of a model that does not exist: `<model>.json` = {model, failed}."""
        write_json(out / self.output_file, {"model": self.model, "failed": failed})
        return {"failed": failed["error"]}

    def scoring_model(self):
        """The evaluated model as a `ScoringModel`, plus its kind ('hf' | 'ensemble') and folder."""
        stage, kind = model_stage(self, self.model)
        path = self.input_path(stage)
        return load_model(path, kind, self.device, name=self.model, batch_size=self.eval_batch_size), kind, path


class EvaluatePerplexity(_EvaluateModel, PerplexityParams):
    """`tasks.perplexity.evaluate_perplexity` on the valid and test splits →
    `eval-<h>/perplexity/<model>.json` = {model, valid: {...}, test: {...}}, each split with its per-document NLL
    and token counts (`docs`: the paired bootstrap of the report's ratios, `tasks.bootstrap`). model=oracle: the oracle-routing
    reference, `tasks.perplexity.oracle_perplexity` of the experts' evaluations (no model runs)."""

    @property
    def hashed(self) -> tuple[str, ...]:  # the token caps enter the hash when set away from their defaults
        caps = tuple(name for name, default in (("eval_max_tokens", EVAL_MAX_TOKENS),
                                                ("eval_max_doc_tokens", EVAL_MAX_DOC_TOKENS))
                     if getattr(self, name) != default)
        return ("model", "eval_max_docs", "seed") + caps

    @property
    def subpath(self) -> str:
        return f"perplexity/{self.model}.json"

    @property
    def gpu_stage(self) -> bool:
        return self.model != ORACLE

    def requires(self):
        if self.model == ORACLE:
            return {"experts": [self.clone(EvaluatePerplexity, model=expert_name(c)) for c in range(self.num_clusters)]}
        return {"model": model_stage(self, self.model)[0], "corpus": self.clone(PrepareCorpus),
                "assignments": self.clone(AssignClusters)}

    def build(self, out: Path) -> dict:
        if self.model == ORACLE:
            return self.build_oracle(out)
        from tasks.perplexity import evaluate_perplexity, evaluation_docs

        failed = self.failure()
        if failed:
            return self.write_failure(out, failed)
        r = self.requires()
        model, kind, path = self.scoring_model()
        result = {"model": self.model, "kind": kind, "path": str(path)}
        for split in ("valid", "test"):
            docs = evaluation_docs(self.input_path(r["corpus"]), self.input_path(r["assignments"]), split,
                                   max_docs=self.eval_max_docs, seed=self.seed)
            result[split] = evaluate_perplexity(model, docs, batch_size=self.eval_batch_size, per_doc=True,
                                                max_tokens=self.eval_max_tokens or None,
                                                max_doc_tokens=self.eval_max_doc_tokens or None)
        write_json(out / self.output_file, result)
        return {split: result[split].get("perplexity") for split in ("valid", "test")}

    def build_oracle(self, out: Path) -> dict:
        from corpus.io import read_json
        from tasks.perplexity import oracle_perplexity

        experts = [read_json(self.input_path(t)) for t in self.requires()["experts"]]
        result = {"model": ORACLE, "kind": ORACLE, "path": None}
        for split in ("valid", "test"):
            result[split] = oracle_perplexity([e[split] for e in experts])
        write_json(out / self.output_file, result)
        return {split: result[split].get("perplexity") for split in ("valid", "test")}


def task_slug(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(task).name if not task.startswith("hf:") else task[3:]).strip("_")


@carries(PrepareCorpus)
class MakeDomainTask(Stage):
    """`tasks.fewshot.build.make_task_from_corpus`: the built-in few-shot task `domains` (classify a document's label
    field, e.g. the demo's domain) → `task-domains-<h>/{train,test}.jsonl, labels.json, task.json}`."""

    folder = "task-domains"
    hashed = ("seed",)

    def requires(self):
        return self.clone(PrepareCorpus)

    def build(self, out: Path) -> dict:
        from tasks.fewshot.build import make_task_from_corpus

        make_task_from_corpus(self.input_path(self.requires()), out, label_field="label", seed=self.seed,
                              max_chars=160, name="domains")
        return None


@carries(MakeDomainTask)
class EvaluateFewShot(_EvaluateModel, FewShotParams):
    """`tasks.fewshot.evaluate.evaluate_fewshot`: k-shot classification of `task` (a folder, a built-in name,
    hf:<dataset>, or `domains`) by `model` over --fewshot-seeds → `eval-<h>/fewshot/<task>/<model>.json`."""

    hashed = ("task", "model", "shots", "fewshot_seeds", "fewshot_max_test")
    task = luigi.Parameter(description="the few-shot task: a folder, a built-in name, hf:<dataset> or domains")

    @property
    def subpath(self) -> str:
        return f"fewshot/{task_slug(self.task)}/{self.model}.json"

    def requires(self):
        req = {"model": model_stage(self, self.model)[0]}
        if self.task == "domains":
            req["task"] = self.clone(MakeDomainTask)
        return req

    def extra_hash(self):
        """A local task folder's files (name, size, mtime): editing the task in place reruns its evaluations."""
        return None if self.task == "domains" else files_fingerprint(self.task)

    def build(self, out: Path) -> dict:
        from tasks.fewshot.evaluate import evaluate_fewshot
        from tasks.fewshot.load import load_task

        failed = self.failure()
        if failed:
            return self.write_failure(out, failed)
        model, _, _ = self.scoring_model()
        spec = str(self.input_path(self.requires()["task"])) if self.task == "domains" else self.task
        task = load_task(spec)
        task.name = task_slug(self.task)
        result = evaluate_fewshot(model, task, shots=self.shots, seeds=self.seed_list,
                                  max_test=self.fewshot_max_test or None, batch_size=self.eval_batch_size,
                                  out_path=out / self.output_file)
        return {"accuracy": result.get("accuracy"), "macro_f1": result.get("macro_f1")}

"""`WriteModelCards`: a README.md model card in every model folder of the run, written once the evaluations exist."""
from __future__ import annotations

from pathlib import Path

from corpus.io import read_json, write_json
from experts.run_models import MOE_MERGED
from pipeline.merging import MergeExperts, merge_failure
from pipeline.params import FewShotTasksParams, carries
from pipeline.stage import Stage
from pipeline.clustering import DescribeClusters
from pipeline.evaluation import EvaluateFewShot, EvaluatePerplexity, task_slug
from pipeline.models import model_names, model_stage

CARD_PARAMS = ("corpus", "num_clusters", "embedder", "clusterer", "seed_model", "model_size", "train_tokens",
               "seed_fraction", "top_k", "temperature", "route_every", "router_init", "moe_top_k", "seed",
               "eval_max_docs")


@carries(EvaluatePerplexity, EvaluateFewShot, DescribeClusters, MergeExperts)
class WriteModelCards(Stage, FewShotTasksParams):
    """`tasks.cards.write_run_cards`: a model card for every model of the run (seed, dense, experts, merges, the MoE before and
    after finetuning, ensembles) with its evaluation figures → `README.md` inside each model folder, and
    `cards-<h>/cards.json` listing them."""

    folder = "cards"

    def requires(self):
        names = model_names(self)
        req = {"models": {m: model_stage(self, m)[0] for m in names},
               "perplexity": {m: self.clone(EvaluatePerplexity, model=m) for m in names},
               "fewshot": {t: {m: self.clone(EvaluateFewShot, task=t, model=m) for m in self.fewshot_model_names(names)}
                           for t in self.task_list},
               "clusters": self.clone(DescribeClusters)}
        if "moe" in self.methods:
            req[MOE_MERGED] = self.clone(MergeExperts, method="moe")
        return req

    def build(self, out: Path) -> dict:
        from tasks.cards import write_run_cards
        from pipeline.training import TrainExpert

        r = self.requires()
        folders = {m: self.input_path(t) for m, t in r["models"].items()}
        if MOE_MERGED in r:
            folders[MOE_MERGED] = self.input_path(r[MOE_MERGED])
        failed = {m: f for m, f in ((m, merge_failure(d)) for m, d in folders.items()) if f}  # no model, no card
        folders = {m: d for m, d in folders.items() if m not in failed}
        written = write_run_cards(
            folders, run={p: getattr(self, p) for p in CARD_PARAMS},
            budget=self.clone(TrainExpert, cluster_id=0).budget_plan(),
            perplexity={m: read_json(self.input_path(t)) for m, t in r["perplexity"].items() if m not in failed},
            fewshot={m: {task_slug(t): read_json(self.input_path(by_model[m])) for t, by_model in r["fewshot"].items()
                         if m in by_model} for m in r["models"] if m not in failed},
            clusters=read_json(self.input_path(r["clusters"]) / "clusters.json").get("clusters", []))
        write_json(out / "cards.json", {**written, **{m: {"failed": f} for m, f in failed.items()}})
        return {"cards": len(written), "failed": sorted(failed)}

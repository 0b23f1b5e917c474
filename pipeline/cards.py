"""`WriteModelCards`: a README.md model card in every model folder of the run, written once the evaluations exist."""
from __future__ import annotations

from pathlib import Path

from corpus.io import read_json, write_json
from corpus.layout import TRAINING_INFO
from pipeline.base import Stage
from pipeline.clustering import DescribeClusters
from pipeline.evaluation import EvaluateFewShot, EvaluatePerplexity, task_slug
from pipeline.models import model_names, model_stage

CARD_PARAMS = ("corpus", "num_clusters", "embedder", "clusterer", "seed_model", "model_size", "train_tokens",
               "seed_fraction", "top_k", "temperature", "route_every", "router_init", "moe_top_k", "seed")


def model_kind(name: str) -> str:
    """The `experts.cards.KIND_TITLES` key of a model name of the run."""
    if name.startswith("expert_"):
        return "expert"
    if name.startswith("ensemble_top"):
        return "ensemble"
    return name if name in ("seed", "dense", "average", "moe", "posterior") else "merge"


class WriteModelCards(Stage):
    """`experts.cards.write_model_card` for every model of the run (seed, dense, experts, merges, the MoE before and
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
            from pipeline.merging import MergeExperts

            req["moe_merged"] = self.clone(MergeExperts, method="moe")
        return req

    def build(self, out: Path) -> dict:
        from experts.cards import ModelCard, write_model_card
        from experts.budget import compute_budget

        r = self.requires()
        clusters = read_json(self.input_path(r["clusters"]) / "clusters.json").get("clusters", [])
        run = _names_only({p: getattr(self, p) for p in CARD_PARAMS})
        budget = compute_budget(self.train_tokens, self.seed_fraction, self.num_clusters)
        perplexity = {m: read_json(self.input_path(t)) for m, t in r["perplexity"].items()}
        fewshot = {m: {task_slug(t): read_json(self.input_path(by_model[m])) for t, by_model in r["fewshot"].items()
                       if m in by_model} for m in r["models"]}
        folders = {m: self.input_path(t) for m, t in r["models"].items()}
        if "moe_merged" in r:
            folders["moe_merged"] = self.input_path(r["moe_merged"])
        written = {}
        for name, folder in folders.items():
            kind = "moe-merged" if name == "moe_merged" else model_kind(name)
            card = ModelCard(name=name, kind=kind, run=run, budget=budget,
                             training=_json_or_none(folder, TRAINING_INFO),
                             perplexity=perplexity.get(name), dense_perplexity=perplexity.get("dense"),
                             fewshot=fewshot.get(name) or None, clusters=clusters)
            if kind == "expert":
                card.cluster = next((c for c in clusters if c.get("cluster_id") == int(name[7:])), None)
                card.clusters = None
            if kind in ("ensemble", "posterior"):
                card.routing = _json_or_none(folder, "ensemble.json")
            method = next((_json_or_none(folder, f) for f in ("average.json", "moe.json", "merge.json")
                           if (folder / f).is_file()), None)
            card.method = _names_only(method) if method else None
            if card.training:  # the card keeps the headline figures, not the curves
                card.training = {k: v for k, v in card.training.items() if not isinstance(v, (list, dict))}
            written[name] = str(write_model_card(folder, card))
        write_json(out / "cards.json", written)
        return {"cards": len(written)}


def _names_only(value):
    """Metadata with local paths cut to their last two parts (cards are uploaded; paths are this machine's)."""
    if isinstance(value, dict):
        return {k: _names_only(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_names_only(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return "/".join(Path(value).parts[-2:])
    return value


def _json_or_none(folder: Path, name: str) -> dict | None:
    return read_json(folder / name) if (folder / name).is_file() else None

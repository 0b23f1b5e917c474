"""Model cards (README.md) for the model folders of a run, and pushing any such folder to the Hugging Face Hub.

`write_model_card(folder, card)` writes `folder/README.md` from a `ModelCard`, and `write_run_cards` one card into
every model folder of a run: what the model is (an expert of
cluster j with its top terms and size, the seed, the dense baseline, a parameter merge, the BTX MoE, a c-BTM or
BTM ensemble), its training (tokens, steps, the run's compute budget), its evaluation figures, and how to load it
(transformers, lm-eval). Pushing a folder with its card to the Hugging Face Hub is `experts.hf_ensemble.push_folder`'s.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from corpus.io import atomic_file, read_json
from corpus.layout import ENSEMBLE_CONFIG, MERGE_INFO, MOE_INFO, TRAINING_INFO
from experts.run_models import DENSE_MOE_COMPUTE, MOE_MERGED, expert_cluster, is_ensemble, is_expert
from tasks.bootstrap import describe_change, ratio_interval
from tasks.report import fmt

KIND_TITLES = {
    "seed": "seed model",
    "dense": "dense baseline",
    "dense-moe-compute": "dense baseline at the BTX MoE's compute",
    "expert": "expert",
    "average": "parameter average of the experts (BTM)",
    "merge": "parameter merge of the experts",
    "moe-merged": "BTX mixture-of-experts, before finetuning",
    "moe": "BTX mixture-of-experts",
    "ensemble": "c-BTM sparse ensemble",
    "posterior": "BTM posterior ensemble",
}


@dataclass
class ModelCard:
    """What a card says about one model folder of a run (fields left None are omitted from the card)."""

    name: str  # the model's name in the run: expert_003, dense, ensemble_top2, ...
    kind: str  # a key of KIND_TITLES
    run: dict = field(default_factory=dict)  # run parameters: corpus, num_clusters, model_size, seed_model, ...
    budget: dict | None = None  # experts.budget.plan_budgets of the run (seed, dense, each expert's true budget)
    training: dict | None = None  # the folder's training.json (tokens_seen, steps, wall_time_s, final_loss, ...)
    cluster: dict | None = None  # an expert's cluster: cluster_id, size, fraction, top_terms, majority_label
    clusters: list[dict] | None = None  # every cluster of the run (ensembles, merges, MoE: one expert each)
    routing: dict | None = None  # an ensemble's ensemble.json (top_k, temperature, route_every, prior, ...)
    perplexity: dict | None = None  # {"valid": evaluate_perplexity result, "test": ...}
    dense_perplexity: dict | None = None  # the dense baseline's, for the compute-matched comparison
    fewshot: dict | None = None  # {task: evaluate_fewshot result}
    method: dict | None = None  # a merge's own metadata (moe.json, merge.json)
    notes: list[str] = field(default_factory=list)
    eval_max_docs: int | None = None  # the evaluation's sample of documents per split (0 or None: all)
    base_model: str | None = None  # what this model was made from: the seed (hub id or the run's seed folder)


_fmt = partial(fmt, thousands=True)  # the cards write 12,345


def _what(card: ModelCard) -> str:
    run, c = card.run, card.cluster
    k = run.get("num_clusters")
    seed = run.get("seed_model", "scratch")
    seed_txt = f"a {run.get('model_size', '')} Llama trained from scratch" if seed == "scratch" else f"`{seed}`"
    if card.kind == "expert" and c is not None:
        terms = ", ".join(c.get("top_terms", [])[:10])
        label = f"; most documents labelled `{c['majority_label']}`" if c.get("majority_label") else ""
        return (f"Expert language model for cluster {c['cluster_id']} of {k} (c-BTM: Gururangan et al. 2023): "
                f"branched from the run's seed model and trained only on the documents of that cluster "
                f"({_fmt(c.get('size'))} training documents, {_fmt(100 * c.get('fraction', 0), 1)}% of the corpus"
                f"{label}). Top terms of the cluster: {terms}.")
    if card.kind == "seed":
        return (f"Seed model of the run (BTM's seed phase): {seed_txt}, trained on the whole corpus for "
                f"{_fmt(run.get('seed_fraction'))} of the token budget; every expert and the dense baseline branch "
                "from it.")
    if card.kind == "dense":
        return ("Compute-matched dense baseline: the seed model trained on the whole corpus for as many tokens as "
                "all experts together (seed + dense = seed + Σ experts = the run's budget).")
    if card.kind == "dense-moe-compute":
        return ("The dense baseline continued on the whole corpus for the tokens the BTX MoE's finetuning adds, with "
                "the finetune's batch and learning rate: the dense model at the MoE's compute.")
    if card.kind in ("average", "merge"):
        return (f"{KIND_TITLES[card.kind].capitalize()}: one model of the experts' shape whose weights merge the "
                f"{k} experts' weights (method metadata below); no training of its own.")
    if card.kind in ("moe", "moe-merged"):
        extra = (" then finetuned on all clusters with the load-balancing loss (extra tokens beyond the "
                 "compute-matched budget, listed below)." if card.kind == "moe" else "; not yet finetuned.")
        router = (card.method or {}).get("router") or {}  # moe.json: what initialised the router
        arch = (card.method or {}).get("architecture") or "Mixtral-style MoE"
        return (f"Branch-Train-MiX (Sukhbaatar et al. 2024): the {k} experts' feed-forward layers as the experts "
                f"of a {arch} (attention and embeddings averaged), router initialised from "
                f"`{router.get('router_init') or run.get('router_init')}`"
                + (f" ({router['method']})" if router.get("method") else "") + extra)
    if card.kind == "ensemble":
        r = card.routing or {}
        return (f"c-BTM sparse ensemble (Gururangan et al. 2023) of the run's {k} experts: each prefix is embedded "
                f"by the clustering's embedder, the top_k = {r.get('top_k')} experts of the nearest centroids are "
                f"mixed with weights softmax(−d²/T), T = {r.get('temperature')}, recomputed every "
                f"{r.get('route_every')} tokens. Only the routed experts run. Not a single network: it loads with "
                "the cbtm package (below).")
    if card.kind == "posterior":
        r = card.routing or {}
        return (f"BTM ensemble (Li et al. 2022) of the run's {k} experts weighted by the domain posterior "
                f"p(j | prefix) (prior `{r.get('prior')}`, top_k = {r.get('top_k')}); every expert scores the "
                "prefix. Loads with the cbtm package (below).")
    return KIND_TITLES.get(card.kind, card.kind)


def _training(card: ModelCard) -> list[str]:
    t, b = card.training, card.budget
    lines = []
    if t:
        lines += ["| tokens seen | steps | wall time | device | final train loss | valid loss | parameters |",
                  "|---|---|---|---|---|---|---|",
                  f"| {_fmt(t.get('tokens_seen'))} | {_fmt(t.get('steps'))} | {_fmt(t.get('wall_time_s'), 0)} s "
                  f"| {t.get('device', '–')} | {_fmt(t.get('final_loss'), 3)} | {_fmt(t.get('valid_loss'), 3)} "
                  f"| {_fmt(t.get('n_params'))} |", ""]
    if b:
        experts = b.get("experts") or []
        per = ", ".join(_fmt(e.get("tokens")) for e in experts)
        mine = next((e for e in experts if card.cluster and e.get("cluster_id") == card.cluster.get("cluster_id")), None)
        lines.append(f"Compute budget of the run (`--compute-match {b.get('compute_match')}`, `--expert-budget "
                     f"{b.get('expert_budget')}`): {_fmt(b.get('train_tokens'))} training tokens = seed "
                     f"{_fmt((b.get('seed') or {}).get('tokens'))} + dense {_fmt((b.get('dense') or {}).get('tokens'))}"
                     f" = seed + the {len(experts)} experts' {_fmt(b.get('expert_tokens_total'))} ({per}: each "
                     "expert's share of the budget follows its cluster's share of the training tokens under "
                     "`proportional`). A token is one token of the run's tokenizer seen by one forward/backward pass.")
        if mine:
            lines += ["", f"This expert's budget: {_fmt(mine.get('tokens'))} tokens in {_fmt(mine.get('steps'))} steps "
                          f"of {_fmt(mine.get('batch_tokens'))} tokens ({_fmt(100 * (mine.get('effective_share') or 0), 1)}% "
                          "of the experts' budget)."]
        lines.append("")
        if card.kind == "moe" and t:
            lines.append(f"The MoE's {_fmt(t.get('tokens_seen'))} finetuning tokens come on top of that budget.")
    if not t and card.kind in ("ensemble", "posterior", "average", "merge", "moe-merged"):
        lines.append("No training of its own: built from the trained experts.")
    return lines


def _evaluation(card: ModelCard) -> list[str]:
    lines = []
    p = card.perplexity or {}
    if p:
        cap = (f"a seeded sample of at most {_fmt(card.eval_max_docs)} documents per split (`--eval-max-docs "
               f"{card.eval_max_docs}`)" if card.eval_max_docs else "every document of the split")
        lines += [f"Perplexity on the run's held-out splits, {cap}:", "",
                  "| split | perplexity | bits per byte | tokens | documents |", "|---|---|---|---|---|"]
        for split in ("valid", "test"):
            o = (p.get(split) or {}).get("overall") or p.get(split) or {}
            if o:
                lines.append(f"| {split} | {_fmt(o.get('perplexity'), 3)} | {_fmt(o.get('bits_per_byte'), 4)} | "
                             f"{_fmt(o.get('n_tokens'))} | {_fmt(o.get('n_docs'))} |")
        dense = ((card.dense_perplexity or {}).get("test") or {}).get("perplexity")
        mine = (p.get("test") or {}).get("perplexity")
        if dense and mine and card.kind != "dense":
            ci = ratio_interval(p.get("test") or {}, (card.dense_perplexity or {}).get("test") or {})
            lines += ["", f"Test perplexity {_fmt(mine, 3)} vs {_fmt(dense, 3)} for the compute-matched dense "
                          f"baseline: {describe_change(ci, mine / dense)}" + (" (paired bootstrap over the test "
                          "documents)." if ci else ".")]
        per = (p.get("test") or {}).get("per_cluster") or {}
        if per:
            lines += ["", "Test perplexity per cluster: " + ", ".join(
                f"{c}: {_fmt(v.get('perplexity') if isinstance(v, dict) else v, 2)}" for c, v in sorted(
                    per.items(), key=lambda kv: int(kv[0])))]
    for task, r in (card.fewshot or {}).items():
        acc = r.get("accuracy") or {}
        chance = ((r.get("baselines") or {}).get("random") or {}).get("accuracy")
        cut = r.get("n_truncated_prompts")
        lines += ["", f"Few-shot `{task}`: accuracy {_fmt(acc.get('mean'), 3)} ± {_fmt(acc.get('std'), 3)} over "
                      f"seeds {r.get('seeds')}, {r.get('shots')} demonstrations asked"
                      + (f" ({cut} prompts cut to fit the context)" if cut else "")
                      + (f"; chance {_fmt(chance, 3)}" if chance is not None else "") + "."]
    return lines or ["Not evaluated by the run."]


def _loading(card: ModelCard) -> list[str]:
    from experts.compat import MIN_TRANSFORMERS

    ensemble = card.kind in ("ensemble", "posterior")
    code = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if ensemble:
        code += ["import experts  # the cbtm package: registers the cbtm_ensemble model type",
                 "", 'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")  # or trust_remote_code=True']
    else:
        code += ["", 'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")']
    code += ['tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
             'batch = tokenizer("The", return_tensors="pt")',
             "out = model.generate(**batch, max_new_tokens=20, do_sample=True, top_p=0.9)",
             "print(tokenizer.decode(out[0]))", "```", "",
             "Evaluate with lm-evaluation-harness (cbtm installed with the `lm-eval` extra):", "",
             "```", "cbtm-lm-eval run --model cbtm --model_args pretrained=path/to/this/folder --tasks <tasks>", "```"]
    if ensemble:
        code += ["", "Its experts are referenced by paths relative to this folder: keep the run folder together, or "
                     "`model.save_pretrained(dst, copy_experts=True)` for a self-contained copy. Needs the cbtm "
                     "package."]
    else:
        code += ["", f"Plain transformers folder: loads with transformers ≥ {MIN_TRANSFORMERS}, no cbtm package "
                     "needed."]
    return code


LICENSE = "apache-2.0"  # the project's licence (LICENSE, setup.cfg); the weights also carry their corpus's terms
BASE_MODEL_RELATION = {"expert": "finetune", "dense": "finetune", "seed": "finetune", "average": "merge",
                       "merge": "merge", "moe-merged": "merge", "moe": "merge", "ensemble": "merge", "posterior": "merge"}


def front_matter(card: ModelCard) -> list[str]:
    """The card's YAML metadata (Hugging Face model-card conventions): library, pipeline tag, licence, tags, the
    base model (the seed: a hub id, or the run's seed folder, to be replaced by its hub id when that is pushed
    too), how this model relates to it, and the training corpus when it is a hub dataset."""
    tags = ["c-btm", "branch-train-merge", card.kind] + (["mixture-of-experts"] if "moe" in card.kind else [])
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", f"license: {LICENSE}", "tags:"]
    lines += [f"- {t}" for t in tags]
    if card.base_model:
        local = card.base_model.startswith(("seed-", ".", "/"))
        lines += [f"base_model: {card.base_model}" + ("  # the run's seed folder: its hub id once pushed" if local
                                                      else ""),
                  f"base_model_relation: {BASE_MODEL_RELATION.get(card.kind, 'finetune')}"]
    corpus = str(card.run.get("corpus") or "")
    if corpus == "demo":
        lines += ["datasets: []  # the built-in demo corpus (corpus/demo.py): text of the local Python installation"]
    elif corpus and not corpus.startswith(("/", ".")) and "*" not in corpus and not Path(corpus).suffix \
            and corpus.count("/") == 1:
        lines += ["datasets:", f"- {corpus}"]
    elif corpus:
        lines += [f"datasets: []  # a local corpus: {Path(corpus).name}"]
    return lines + ["---"]


def render_model_card(card: ModelCard) -> str:
    """The README.md text: YAML metadata for the hub, then what / training / evaluation / loading."""
    lines = front_matter(card)
    lines += ["", f"# {card.name}: {KIND_TITLES.get(card.kind, card.kind)}", "", _what(card), ""]
    if card.clusters and card.kind != "expert":
        lines += ["## Experts", "", "| expert (cluster) | training documents | top terms |", "|---|---|---|"]
        lines += [f"| {c['cluster_id']} | {_fmt(c.get('size'))} | {', '.join(c.get('top_terms', [])[:6])} |"
                  for c in card.clusters]
        lines.append("")
    if card.method:
        lines += ["## Method", "", "```json", _json(card.method), "```", ""]
    lines += ["## Training", ""] + _training(card) + [""]
    lines += ["## Evaluation", ""] + _evaluation(card) + [""]
    r = card.run
    lines += ["## Run", "", f"corpus `{r.get('corpus')}`, {r.get('num_clusters')} clusters ({r.get('embedder')} "
              f"embedder, {r.get('clusterer')} k-means), seed model `{r.get('seed_model')}` "
              f"({r.get('model_size')}), seed {r.get('seed')}. Made by the cbtm pipeline "
              "(Cluster-Branch-Train-Merge).", "",
              f"Licence: {LICENSE} (the cbtm code's licence); what the model learned comes from its training corpus, "
              "whose terms apply to it as well.", ""]
    lines += ["## How to load", ""] + _loading(card) + [""]
    lines += card.notes
    return "\n".join(lines).rstrip() + "\n"


def _json(d: dict) -> str:
    import json

    return json.dumps(d, indent=2, default=str)


def write_model_card(folder: str | os.PathLike, card: ModelCard) -> Path:
    """Write `folder/README.md` (atomically) and return its path."""
    path = Path(folder) / "README.md"
    with atomic_file(path) as f:
        f.write(render_model_card(card))
    return path


def card_kind(name: str) -> str:
    """The `KIND_TITLES` key of a model name of a run (`moe_merged`: the MoE before finetuning)."""
    if name == MOE_MERGED:
        return "moe-merged"
    if name == DENSE_MOE_COMPUTE:
        return "dense-moe-compute"
    if is_expert(name):
        return "expert"
    if is_ensemble(name):
        return "ensemble"
    return name if name in ("seed", "dense", "average", "moe", "posterior") else "merge"


def names_only(value):
    """Metadata with local paths cut to their last two parts (cards are uploaded; paths are this machine's)."""
    if isinstance(value, dict):
        return {k: names_only(v) for k, v in value.items()}
    if isinstance(value, list):
        return [names_only(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return "/".join(Path(value).parts[-2:])
    return value


def write_run_cards(folders: dict[str, Path], run: dict, budget: dict, perplexity: dict, fewshot: dict,
                    clusters: list[dict]) -> dict[str, str]:
    """A card in each of `folders` ({model name: folder}): `run` (the run's parameters, `eval_max_docs` among them;
    local paths cut by `names_only`), `budget` (`experts.budget.plan_budgets`), `perplexity` and `fewshot` ({model
    name: results}),
    `clusters` (`describe_clusters`' clusters). Reads each folder's training.json, ensemble.json and merge metadata.
    Returns {model name: path of its README.md}."""
    written = {}
    for name, folder in folders.items():
        folder = Path(folder)
        kind = card_kind(name)
        card = ModelCard(name=name, kind=kind, run=names_only(run), budget=budget,
                         training=_json_or_none(folder, TRAINING_INFO),
                         perplexity=perplexity.get(name), dense_perplexity=perplexity.get("dense"),
                         fewshot=fewshot.get(name) or None, clusters=clusters, eval_max_docs=run.get("eval_max_docs"),
                         base_model=_base_model(name, run, folders))
        if kind == "expert":
            card.cluster = next((c for c in clusters if c.get("cluster_id") == expert_cluster(name)), None)
            card.clusters = None
        if kind in ("ensemble", "posterior"):
            card.routing = _json_or_none(folder, ENSEMBLE_CONFIG)
        method = next((_json_or_none(folder, f) for f in (MOE_INFO, MERGE_INFO)
                       if (folder / f).is_file()), None)
        if method is None and kind == "moe" and MOE_MERGED in folders:  # the finetuned MoE: how it was built
            method = _json_or_none(Path(folders[MOE_MERGED]), MOE_INFO)
        card.method = names_only(method) if method else None
        if card.training:  # the card keeps the headline figures, not the curves
            card.training = {k: v for k, v in card.training.items() if not isinstance(v, (list, dict))}
        written[name] = str(write_model_card(folder, card))
    return written


def _base_model(name: str, run: dict, folders: dict[str, Path]) -> str | None:
    """The seed this model was made from: the pretrained seed's hub id or folder name, or (a seed trained from
    scratch) the run's seed folder name; None for a scratch seed itself."""
    seed_model = str(run.get("seed_model") or "scratch")
    pretrained = None if seed_model == "scratch" else (seed_model if not Path(seed_model).exists()
                                                       else Path(seed_model).name)
    if name == "seed":
        return pretrained
    seed = folders.get("seed")
    return Path(seed).name if seed is not None else pretrained


def _json_or_none(folder: Path, name: str) -> dict | None:
    return read_json(folder / name) if (folder / name).is_file() else None

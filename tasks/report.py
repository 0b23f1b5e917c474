"""The run report: `report.json` (machine-readable) and `report.md` (tables and figures) of one pipeline run.

`write_report(out_dir, run_info, cluster_info, perplexity, fewshot, budgets, timings)` writes into `out_dir`
(atomically): `report.json`, `report.md` and `figures/*.png`: the cluster plots handed in by
`clustering.inspect.describe_clusters`, and those `tasks.figures` draws (perplexity ÷ dense, model × cluster
heat map, label × cluster routing matrix, few-shot accuracy with its chance line, MoE routing load, training
curves). report.md opens with the headline (`headline`): c-BTM against dense at equal compute, the best model,
and the MoE's extra finetuning tokens.

report.json schema (version 1); every key is always present, values may be null/empty:
```
{
  "schema_version": 1,
  "headline":   {"sentences": [str], "best": model of lowest test perplexity (oracle excluded) | null,
                 "vs_dense": {model: test perplexity ÷ dense − 1},
                 "vs_dense_interval": {model: [low, high] of that change, paired bootstrap over test documents]}},
  "run":        {"run_dir", "created", "params": {flag: value}, "corpus": {"source", "n_docs": {split: n},
                 "label_field", "n_empty_dropped"}, "models": [model names], "folders": {model: folder relative
                 to run_dir} (the three c-BTM ensembles ensemble_top1/top2/topall are three merged-<h>/ensemble)},
  "clusters":   {"n_clusters", "algorithm", "embedder", "sizes": {split: [n per cluster]}, "top_terms":
                 [[term, ...] per cluster], "nmi", "purity", "label_distribution": {cluster_id: {label: n}},
                 "figures": [relative png paths], ...everything else describe_clusters returned},
  "perplexity": {model: {"valid": {"perplexity", "bits_per_byte", "n_tokens", "per_cluster": {id: ppl},
                                   "per_label": {label: ppl}, "vs_dense": tasks.bootstrap.ratio_interval of
                                   perplexity ÷ dense's | null}, "test": {...}}},   (model "oracle": oracle routing)
  "oracle_ratio": {ensemble: {split: {"overall": ppl / oracle ppl, "per_cluster": {id: ratio}}}},
  "fewshot":    {task: {model: {"accuracy": {"mean", "std"}, "macro_f1": {"mean", "std"}, "shots", "seeds",
                               "n_test", "baselines": {"majority": {...}, "random": {...}}, "routing",
                               "mean_demos": demonstrations per prompt, mean over seeds (< shots: prompts were
                               cut to fit the context), "n_truncated_prompts", "n_prompts"}}},
  "budgets":    {"plan": experts.budget.plan_budgets dict, "compute_match", "expert_budget",
                 "models": {model: {"tokens_seen", "steps", "global_batch_tokens", "data_tokens", "epochs",
                                    "wall_time_s", "gpu_hours", "valid_loss", "kept_step"[, "share",
                                    "effective_share"]}},
                 "totals": {"cbtm_tokens": seed + Σ experts, "dense_tokens": seed + dense, "cbtm_gpu_hours",
                           "dense_gpu_hours", "expert_tokens", "rounding"}},
  "timings":    {stage: {"runs", "wall_time_s"}},
  "merges":     {"parameter": {method: {"recipe", "weights", "lambda_search": {λ: validation NLL} | null}},
                 "failed": {method: {"error", "fix"}}  (merges whose method failed; absent from the tables),
                 "moe": {"shared", "router_init", "router": how it was initialised, "top_k", "num_local_experts", "finetune_tokens",
                         "extra_tokens_fraction": finetune tokens / compute-matched budget,
                         "routing": {"tokens", "max_entropy", "per_layer": [{"layer", "per_token_entropy",
                                     "mean_router_entropy", "load": [fraction of routed slots per expert]}]}} | null}
}
```
Perplexities are exp(mean NLL per token) under each model's own tokenizer (all models of a run share one). Every
ratio to dense carries a 95% paired-bootstrap interval over the evaluated documents (`tasks.bootstrap`); a change
whose interval contains 0 reads "no difference beyond noise", never as a win.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from corpus.io import atomic_dir, write_json
from experts.run_models import DENSE_MOE_COMPUTE, ORACLE, ensemble_top_k, expert_name, is_expert
from tasks.bootstrap import describe_change

SCHEMA_VERSION = 1


def write_report(
    out_dir: str | os.PathLike,
    run_info: dict,
    cluster_info: dict | None,
    perplexity: dict[str, dict],
    fewshot: dict[str, dict[str, dict]] | None = None,
    budgets: dict | None = None,
    timings: dict[str, dict] | None = None,
    merges: dict | None = None,
) -> dict:
    """Write `out_dir/{report.json, report.md, figures/}` and return the report.json dict.

    perplexity: {model: {"valid": evaluate_perplexity result, "test": ...}}; fewshot: {task: {model:
    evaluate_fewshot result}}; cluster_info: describe_clusters' dict, whose "figures" (or "plots") list PNG
    paths that are copied into `figures/`; budgets: {"plan": experts.budget.plan_budgets dict, "models": {model:
    training.json}} (their loss curves are plotted); timings: {stage: {"runs", "wall_time_s"}}; merges:
    {"parameter": {method: merge.json}, "moe": {"build": moe.json, "routing": routing.json, "training":
    training.json}, "failed": {method: failed.json}} (see `_merges`).
    """
    out_dir = Path(out_dir)
    report = {
        "schema_version": SCHEMA_VERSION,
        "run": {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), **run_info},
        "clusters": _clusters(cluster_info or {}),
        "perplexity": {m: {s: _ppl_summary(r.get(s), (perplexity.get("dense") or {}).get(s)) for s in ("valid", "test")
                           if r.get(s)} for m, r in perplexity.items()},
        "oracle_ratio": _oracle_ratio(perplexity),
        "fewshot": {t: {m: _fewshot_summary(r) for m, r in by_model.items()} for t, by_model in (fewshot or {}).items()},
        "budgets": _budgets(budgets or {}),
        "timings": timings or {},
        "merges": _merges(merges or {}, budgets or {}),
    }
    moe_test, equal_test = ((perplexity.get(m) or {}).get("test") for m in ("moe", DENSE_MOE_COMPUTE))
    if moe_test and equal_test and (report["perplexity"].get("moe") or {}).get("test"):
        from tasks.bootstrap import ratio_interval

        report["perplexity"]["moe"]["test"]["vs_equal_compute_dense"] = ratio_interval(moe_test, equal_test)
    report["headline"] = _headline(report)
    from tasks import figures  # matplotlib: only when figures are drawn, not for render_markdown (publish_report)

    with atomic_dir(out_dir) as tmp:
        fig_dir = tmp / "figures"
        fig_dir.mkdir()
        copied = []
        for src in _figure_paths(cluster_info or {}):
            dst = fig_dir / Path(src).name
            shutil.copyfile(src, dst)
            copied.append(f"figures/{dst.name}")
        report["clusters"]["figures"] = copied
        ppl, cl = report["perplexity"], report["clusters"]
        models = [*ppl, *(m for t in report["fewshot"].values() for m in t), *((budgets or {}).get("models") or {})]
        colours = figures.model_colours(list(dict.fromkeys(models)))
        drawn = [
            figures.perplexity_figure(ppl, fig_dir / "perplexity.png", colours),
            figures.cluster_heatmap(ppl, fig_dir / "perplexity_clusters.png", cl),
            figures.routing_matrix(cl.get("label_distribution") or {}, fig_dir / "routing_labels.png",
                                   (run_info.get("corpus") or {}).get("label_field")),
            figures.fewshot_figure(report["fewshot"], fig_dir / "fewshot.png", colours),
            figures.moe_routing_figure(report["merges"]["moe"], fig_dir / "moe_routing.png"),
            figures.training_curves((budgets or {}).get("models") or {}, fig_dir / "training_curves.png", colours),
        ]
        report["figures"] = copied + [d for d in drawn if d]
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return report


# ---- summaries --------------------------------------------------------------------------------------------
def _clusters(info: dict) -> dict:
    """describe_clusters' dict, with the per-cluster lists lifted to the top level the schema documents."""
    out = dict(info)
    per = [c for c in info.get("clusters") or [] if isinstance(c, dict)]
    if out.get("top_terms") is None and per and any("top_terms" in c for c in per):
        out["top_terms"] = [c.get("top_terms") or [] for c in per]
    if out.get("label_distribution") is None and per and any("label_distribution" in c for c in per):
        out["label_distribution"] = {str(c.get("cluster_id", i)): c.get("label_distribution") or {}
                                     for i, c in enumerate(per)}
    sizes = out.get("sizes")
    if isinstance(sizes, list):
        sizes = {"train": sizes}
        for split, s in ((out.get("assignment_summary") or {}).get("splits") or {}).items():
            if split != "train" and isinstance(s, dict) and s.get("sizes") is not None:
                sizes[split] = s["sizes"]
        out["sizes"] = sizes
    for key in ("n_clusters", "algorithm", "embedder", "sizes", "top_terms", "nmi", "purity", "label_distribution"):
        out.setdefault(key, None)
    if out.get("algorithm") is None:
        out["algorithm"] = (out.get("assignment_summary") or {}).get("algorithm")
    out.pop("out_dir", None)
    return out


def _figure_paths(info: dict) -> list[str]:
    paths = info.get("figures") or info.get("plots") or []
    if isinstance(paths, dict):
        paths = list(paths.values())
    base = Path(info.get("out_dir", "."))
    found = []
    for p in paths:
        q = Path(p) if Path(p).is_absolute() else base / p
        if q.is_file() and q.suffix.lower() == ".png":
            found.append(str(q))
    return found


def _ppl_summary(r: dict | None, dense: dict | None = None) -> dict | None:
    """The figures the report keeps of one evaluation, with the bootstrap interval of its ratio to `dense` (the
    dense model's evaluation of the same split; None without per-document figures or for dense itself)."""
    from tasks.bootstrap import ratio_interval

    if not r:
        return None
    return {
        "vs_dense": ratio_interval(r, dense) if dense and r is not dense else None,
        "perplexity": r.get("perplexity"),
        "bits_per_byte": r.get("bits_per_byte"),
        "n_tokens": r.get("n_tokens"),
        "n_docs": r.get("n_docs"),
        "per_cluster": {str(k): v.get("perplexity") for k, v in (r.get("per_cluster") or {}).items()},
        "per_label": {str(k): v.get("perplexity") for k, v in (r.get("per_label") or {}).items()},
        "tokens_per_s": r.get("tokens_per_s"),
    }


def _oracle_ratio(perplexity: dict[str, dict]) -> dict:
    """Perplexity of every ensemble (evaluation kind 'ensemble') over that of oracle routing, overall and per
    cluster: 1.00 means the ensemble does as well as each document's own expert. Empty without an oracle."""
    oracle = perplexity.get(ORACLE) or {}
    out = {}
    for m, r in perplexity.items():
        if r.get("kind") != "ensemble":
            continue
        for split in ("valid", "test"):
            e, o = r.get(split) or {}, oracle.get(split) or {}
            if not e or not o:
                continue
            o_pc = {c: g.get("perplexity") for c, g in (o.get("per_cluster") or {}).items()}
            e_pc = {c: g.get("perplexity") for c, g in (e.get("per_cluster") or {}).items()}
            out.setdefault(m, {})[split] = {
                "overall": _ratio(e.get("perplexity"), o.get("perplexity")),
                "per_cluster": {c: _ratio(e_pc.get(c), o_pc[c]) for c in o_pc},
            }
    return out


def _headline(report: dict) -> dict:
    """The run in a few sentences: each c-BTM ensemble (`ensemble_top<k>`) against dense, and whether that is
    at equal compute (c-BTM's seed + experts tokens against dense's seed + dense tokens); the best model (oracle
    routing excluded: it reads the future); the MoE with its extra finetuning tokens flagged."""
    test = {m: ((r.get("test") or {}).get("perplexity")) for m, r in report["perplexity"].items()}
    test = {m: v for m, v in test.items() if v and m != ORACLE}
    dense = test.get("dense")
    vs = {m: v / dense - 1 for m, v in test.items() if dense and m != "dense"}
    totals = report["budgets"].get("totals") or {}
    c, d = totals.get("cbtm_tokens"), totals.get("dense_tokens")
    compute = ("at equal compute" if c and d and abs(c - d) <= 0.005 * d else
               f"at {100 * c / d:.1f}% of dense's training tokens" if c and d else "(training tokens unknown)")
    moe = (report.get("merges") or {}).get("moe") or {}
    extra = ""
    if moe.get("finetune_tokens"):
        frac = moe.get("extra_tokens_fraction")
        extra = (f"{moe['finetune_tokens']} extra finetuning tokens"
                 + (f" (+{100 * frac:.0f}% of the compute-matched budget)" if frac else ""))

    cis = {m: ((report["perplexity"].get(m) or {}).get("test") or {}).get("vs_dense") for m in vs}

    def pct(m):  # the change with its bootstrap interval; "no difference beyond noise" when that contains 0
        return describe_change(cis.get(m), 1 + vs[m])

    def noise(m):  # the sentence's ending: nothing, or that the change is within the noise
        ci = cis.get(m)
        return ": no difference beyond noise" if ci and not ci["beyond_noise"] else ""

    sentences = []
    for m in [m for m in test if ensemble_top_k(m) is not None and m in vs]:
        k = ensemble_top_k(m)
        change = pct(m).removesuffix(", no difference beyond noise")
        sentences.append(f"c-BTM top-{k} vs dense {compute}: test perplexity {test[m]:.2f} vs {dense:.2f}, "
                         f"{change}{noise(m)}.")
    best = min(test, key=test.get) if test else None
    if best is not None:
        flag = f", with {extra} that c-BTM and dense do not get" if best == "moe" and extra else ""
        sentences.append(f"Best model: {best}, test perplexity {test[best]:.2f}"
                         + (f" ({pct(best)} vs dense)" if best in vs else "") + f"{flag}.")
    if "moe" in vs and best != "moe":
        sentences.append(f"BTX MoE vs dense: {pct('moe')} test perplexity" + (f", with {extra}." if extra else "."))
    if test.get("moe") and test.get(DENSE_MOE_COMPUTE):
        ci = ((report["perplexity"].get("moe") or {}).get("test") or {}).get("vs_equal_compute_dense")
        sentences.append(f"BTX MoE vs dense at equal compute ({DENSE_MOE_COMPUTE}: dense continued for the MoE's "
                         f"finetuning tokens): test perplexity {test['moe']:.2f} vs {test[DENSE_MOE_COMPUTE]:.2f}, "
                         f"{describe_change(ci, test['moe'] / test[DENSE_MOE_COMPUTE])}.")
    if any(cis.values()):
        n = next(ci for ci in cis.values() if ci)
        sentences.append(f"[95%: …]: paired-bootstrap interval of the ratio over the {n['n_docs']} test documents "
                         "(the noise of which documents were drawn, not of training).")
    interval = {m: [ci["low"] - 1, ci["high"] - 1] for m, ci in cis.items() if ci}
    return {"sentences": sentences, "best": best, "vs_dense": vs, "vs_dense_interval": interval}


def _ratio(a, b):
    return a / b if a is not None and b else None


def _fewshot_summary(r: dict) -> dict:
    out = {k: r.get(k) for k in ("accuracy", "macro_f1", "shots", "shots_asked", "seeds", "n_test", "scoring",
                                  "baselines", "routing", "wall_time_s", "n_truncated_prompts")}
    demos = [e["mean_demos"] for e in r.get("per_seed") or [] if e.get("mean_demos") is not None]
    out["mean_demos"] = sum(demos) / len(demos) if demos else None
    out["n_prompts"] = r["n_test"] * len(r["seeds"]) if r.get("n_test") and r.get("seeds") else None
    return out


def beats_chance(r: dict) -> bool:
    """Whether a few-shot result's mean accuracy exceeds the better of its random and majority baselines by more
    than two binomial standard errors of chance accuracy over its test examples."""
    acc = (r.get("accuracy") or {}).get("mean")
    base = r.get("baselines") or {}
    levels = []
    for name in ("random", "majority"):
        b = (base.get(name) or {}).get("accuracy")
        b = b.get("mean") if isinstance(b, dict) else b
        if b is not None:
            levels.append(b)
    n = r.get("n_test") or 0
    if acc is None or not levels or not n:
        return False
    p = max(levels)
    return acc > p + 2 * (p * (1 - p) / n) ** 0.5


def _budgets(b: dict) -> dict:
    """Per model: tokens, steps, global batch, epochs over its own data, wall time, GPU-hours, validation loss and
    the step whose weights were kept; the plan (`experts.budget.plan_budgets`: compute matching, expert budgets,
    shares); totals for c-BTM (seed + experts) and dense (seed + dense)."""
    plan = b.get("plan") or {}
    shares = {expert_name(e["cluster_id"]): (e.get("share"), e.get("effective_share"))
              for e in plan.get("experts") or []}
    planned_data = {expert_name(e["cluster_id"]): e.get("data_tokens") for e in plan.get("experts") or []}
    models = {}
    for m, t in (b.get("models") or {}).items():
        if not t:
            continue
        row = {k: t.get(k) for k in ("tokens_seen", "steps", "wall_time_s", "gpu_hours", "valid_loss", "kept_step")}
        row["global_batch_tokens"] = (t.get("plan") or {}).get("tokens_per_step")
        row["data_tokens"] = t.get("data_tokens") or planned_data.get(m)
        row["epochs"] = (row["tokens_seen"] / row["data_tokens"]) if row["tokens_seen"] and row["data_tokens"] else None
        if m in shares:
            row["share"], row["effective_share"] = shares[m]
        models[m] = row

    def tok(m):
        return (models.get(m) or {}).get("tokens_seen") or 0

    def gpu(m):
        return (models.get(m) or {}).get("gpu_hours") or 0.0

    experts = [m for m in models if is_expert(m)]
    totals = {
        "cbtm_tokens": tok("seed") + sum(tok(m) for m in experts),
        "dense_tokens": tok("seed") + tok("dense"),
        "cbtm_gpu_hours": gpu("seed") + sum(gpu(m) for m in experts),
        "dense_gpu_hours": gpu("seed") + gpu("dense"),
        "expert_tokens": sum(tok(m) for m in experts),
        "rounding": plan.get("rounding"),
    }
    return {"plan": plan, "compute_match": plan.get("compute_match"), "expert_budget": plan.get("expert_budget"),
            "models": models, "totals": totals}


_MATCH_TEXT = {
    "steps": "every expert runs the dense model's number of optimizer steps with a global batch of the dense batch × "
             "its share (the c-BTM and BTM papers' matching)",
    "tokens": "every expert trains at the dense batch for its share of the dense model's steps",
}
_BUDGET_TEXT = {
    "proportional": "an expert's share is its cluster's share of the training tokens, so every expert passes over "
                    "its data about as often as dense over all data",
    "uniform": "every expert gets 1/k of the experts' budget",
}


# ---- markdown -----------------------------------------------------------------------------------------------
def fmt(x: Any, digits: int = 2, thousands: bool = False) -> str:
    """A number as the report's tables write it: `digits` decimals for a float, '–' for None; `thousands`: with
    thousands separators, ints too (12,345: the model cards)."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:{',' if thousands else ''}.{digits}f}"
    if thousands and isinstance(x, int):
        return f"{x:,}"
    return str(x)


def render_markdown(report: dict) -> str:
    run, cl = report["run"], report["clusters"]
    lines = ["# c-BTM run report", ""]
    lines += [f"- {h}" for h in (report.get("headline") or {}).get("sentences") or []]
    lines += ["", f"Run folder `{run.get('run_dir')}`, written {run.get('created')}.", ""]
    corpus = run.get("corpus") or {}
    if corpus:
        n = corpus.get("n_docs") or {}
        lines += [f"Corpus `{corpus.get('source')}`: {n.get('train')} train / {n.get('valid')} valid / "
                  f"{n.get('test')} test documents; label field: `{corpus.get('label_field')}`.", ""]
    params = run.get("params") or {}
    if params:
        keys = ("num_clusters", "embedder", "clusterer", "assign", "seed_model", "model_size", "train_tokens",
                "seed_fraction", "top_k", "temperature", "branch_from", "merge_methods")
        lines += ["Settings: " + ", ".join(f"`--{k.replace('_', '-')} {params[k]}`" for k in keys if k in params), ""]
    for method, why in (run.get("skipped") or {}).items():
        lines += [f"Merge `{method}` skipped: {why}.", ""]
    folders = run.get("folders") or {}
    if folders:
        lines += ["Model folders (under the run folder; each loads with `AutoModelForCausalLM`, ensembles after "
                  "`import experts`; an ensemble's `config.json` names it and its `routing_top_k`):", "",
                  "| model | folder |", "|---|---|"]
        lines += [f"| {m} | `{f}` |" for m, f in folders.items()]
        lines.append("")

    lines += ["## Clusters", ""]
    sizes = cl.get("sizes") or {}
    if isinstance(sizes, list):
        sizes = {"train": sizes}
    terms = cl.get("top_terms") or []
    k = cl.get("n_clusters") or max([len(v) for v in sizes.values()] + [len(terms)] + [0])
    if k:
        splits = list(sizes)
        lines += ["| cluster | " + " | ".join(f"{s} docs" for s in splits) + " | top TF-IDF terms |",
                  "|---:|" + "---:|" * len(splits) + "---|"]
        for c in range(k):
            row = [str(sizes[s][c]) if c < len(sizes[s]) else "–" for s in splits]
            t = ", ".join(terms[c][:10]) if c < len(terms) and terms[c] else _nearest(cl, c)
            lines.append(f"| {c} | " + " | ".join(row) + f" | {t} |")
        lines.append("")
    if cl.get("nmi") is not None or cl.get("purity") is not None:
        lines += [f"Against the label field: NMI {fmt(cl.get('nmi'), 3)}, purity {fmt(cl.get('purity'), 3)}.", ""]
    dist = cl.get("label_distribution")
    if isinstance(dist, dict) and dist:
        labels = sorted({lab for d in dist.values() if isinstance(d, dict) for lab in d})
        if labels and len(labels) <= 20:
            lines += ["| cluster | " + " | ".join(labels) + " |", "|---:|" + "---:|" * len(labels)]
            for c, d in dist.items():
                lines.append(f"| {c} | " + " | ".join(str(d.get(lab, 0)) for lab in labels) + " |")
            lines.append("")
    lines += _figure(report, "routing_labels.png", "label × cluster routing")
    for fig in cl.get("figures") or []:
        lines += [f"![{Path(fig).stem}]({fig})", ""]

    ppl = report["perplexity"]
    if ppl:
        lines += ["## Perplexity", ""]
        clusters = sorted({c for r in ppl.values() for c in ((r.get("test") or {}).get("per_cluster") or {})}, key=_num)
        lines += ["| model | valid ppl | test ppl | test ÷ dense (95% interval) | "
                  + " | ".join(f"test c{c}" for c in clusters) + " |", "|---|---:|---:|---:|" + "---:|" * len(clusters)]
        for m, r in ppl.items():
            v, t = r.get("valid") or {}, r.get("test") or {}
            pc, ci = t.get("per_cluster") or {}, t.get("vs_dense")
            vs = (f"{ci['ratio']:.3f} ({ci['low']:.3f}–{ci['high']:.3f})" + ("" if ci["beyond_noise"] else " ≈")
                  if ci else "–")
            lines.append(f"| {m} | {fmt(v.get('perplexity'))} | {fmt(t.get('perplexity'))} | {vs} | "
                         + " | ".join(fmt(pc.get(c)) for c in clusters) + " |")
        lines += ["", "test ÷ dense: paired bootstrap over the test documents (`tasks.bootstrap`); ≈ marks an interval "
                  "that contains 1, no difference from dense beyond noise.", ""]
        labels = sorted({lab for r in ppl.values() for lab in ((r.get("test") or {}).get("per_label") or {})})
        if labels and len(labels) <= 20:
            lines += ["Test perplexity per label:", "", "| model | " + " | ".join(labels) + " |",
                      "|---|" + "---:|" * len(labels)]
            for m, r in ppl.items():
                pl = (r.get("test") or {}).get("per_label") or {}
                lines.append(f"| {m} | " + " | ".join(fmt(pl.get(lab)) for lab in labels) + " |")
            lines.append("")
        ratio = report.get("oracle_ratio") or {}
        if ratio:
            lines += ["Ensembles against oracle routing (`oracle`: each document scored by the expert of the cluster "
                      "its full text is assigned to, a reference that reads the future): test perplexity ÷ oracle "
                      "test perplexity, 1.00 = as good as each document's own expert.", "",
                      "| model | test | " + " | ".join(f"test c{c}" for c in clusters) + " |",
                      "|---|---:|" + "---:|" * len(clusters)]
            for m, r in ratio.items():
                t = r.get("test") or {}
                pc = t.get("per_cluster") or {}
                lines.append(f"| {m} | {fmt(t.get('overall'), 3)} | " + " | ".join(fmt(pc.get(c), 3) for c in clusters) + " |")
            lines.append("")
        lines += _figure(report, "perplexity.png", "test perplexity relative to dense")
        lines += _figure(report, "perplexity_clusters.png", "model × cluster test perplexity relative to dense")

    fs = report["fewshot"]
    if not fs and str((run.get("params") or {}).get("tasks", "")).strip().lower() == "none":
        lines += ["## Few-shot classification", "", "Not run (`--tasks none`).", ""]
    if fs:
        lines += ["## Few-shot classification", "", "| task | model | shots (asked) | demonstrations used | accuracy | "
                  "macro-F1 |", "|---|---|---:|---:|---:|---:|"]
        cut = []
        for task, by_model in fs.items():
            base = None
            for m, r in by_model.items():
                acc, f1 = r.get("accuracy") or {}, r.get("macro_f1") or {}
                asked = r.get("shots_asked")
                shots = f"{r.get('shots')} ({asked})" if asked is not None and asked != r.get("shots") else r.get("shots")
                lines.append(f"| {task} | {m} | {shots} | {fmt(r.get('mean_demos'), 1)} | "
                             f"{fmt(acc.get('mean'), 3)} ± {fmt(acc.get('std'), 3)} "
                             f"| {fmt(f1.get('mean'), 3)} ± {fmt(f1.get('std'), 3)} |")
                base = base or r.get("baselines")
                if r.get("n_truncated_prompts"):
                    cut.append((task, m, r))
            for name, b in (base or {}).items():
                acc = b.get("accuracy")
                acc = acc.get("mean") if isinstance(acc, dict) else acc
                f1 = b.get("macro_f1")
                f1 = f1.get("mean") if isinstance(f1, dict) else f1
                title = "random guess (chance)" if name == "random" else name
                lines.append(f"| {task} | *{title} baseline* | – | – | {fmt(acc, 3)} | {fmt(f1, 3)} |")
        lines.append("")
        for task, by_model in fs.items():
            if by_model and not any(beats_chance(r) for r in by_model.values()):
                r = next(iter(by_model.values()))
                lines += [f"**No model does better than chance on `{task}`** (the better of the random and majority "
                          f"baselines, by more than two binomial standard errors over {r.get('n_test')} examples): at "
                          "this model size and context, in-context classification measures nothing here; read these "
                          "figures as a check that the evaluation runs, not as a comparison.", ""]
        if any((r.get("shots_asked") or 0) > (r.get("shots") or 0) for b in fs.values() for r in b.values()):
            lines += ["Shots (asked): the prompts hold the demonstrations a typical prompt fits in the model's "
                      "context, fewer than asked (`tasks.fewshot.prompts.shots_that_fit`).", ""]
        if cut:
            task, m, r = cut[0]
            lines += [f"**Prompts cut to fit the context:** {len(cut)} of {sum(len(b) for b in fs.values())} "
                      f"evaluations dropped demonstrations from the front of prompts longer than the model's context "
                      f"(e.g. {task} / {m}: {r['n_truncated_prompts']} of {fmt(r.get('n_prompts'))} prompts, "
                      f"{fmt(r.get('mean_demos'), 1)} of {r.get('shots')} demonstrations kept on average); the "
                      "'demonstrations used' column is what the models saw.", ""]
        lines += _figure(report, "fewshot.png", "few-shot accuracy")

    bud = report["budgets"]
    if bud.get("models"):
        plan, tot = bud.get("plan") or {}, bud.get("totals") or {}
        lines += ["## Budgets", ""]
        if plan:
            match, policy = plan.get("compute_match"), plan.get("expert_budget")
            lines += [f"Compute matching `--compute-match {match}`: {_MATCH_TEXT.get(match, match)}. Expert budgets "
                      f"`--expert-budget {policy}`: {_BUDGET_TEXT.get(policy, policy)}. Budget "
                      f"{plan.get('train_tokens')} tokens = seed {plan.get('seed_tokens')} + "
                      f"{plan.get('dense_tokens')} for the dense model or for the {plan.get('n_clusters')} experts "
                      f"together; in whole steps of whole {plan.get('seq_len')}-token blocks the experts get "
                      f"{plan.get('expert_tokens_total')} tokens, {plan.get('rounding')} fewer than dense "
                      f"({(plan.get('dense') or {}).get('tokens')}).", ""]
            small = [e for e in plan.get("experts") or [] if e.get("small")]
            if small:
                rule = plan.get("small_share")
                lines += [f"**Shares below one block:** {len(small)} of {len(plan.get('experts') or [])} experts "
                          f"(clusters {', '.join(str(e['cluster_id']) for e in small)}) have less than one block of "
                          f"the dense batch as their share; `--small-share {rule}`: "
                          + (f"each trains one block per step for its share of the dense model's "
                             f"{(plan.get('dense') or {}).get('steps')} steps (the same tokens; "
                             f"{', '.join(str(e['steps']) for e in small)} steps)."
                             if rule == "fewer_steps" else "each trains one block per step for all steps, those "
                             "blocks taken from the larger experts."), ""]
        lines += [f"Tokens seen: c-BTM (seed + experts) {tot.get('cbtm_tokens')}, dense (seed + dense) "
                  f"{tot.get('dense_tokens')}; GPU-hours: c-BTM {fmt(tot.get('cbtm_gpu_hours'), 4)}, dense "
                  f"{fmt(tot.get('dense_gpu_hours'), 4)}.", "",
                  "| model | share → in whole blocks | tokens | steps | global batch (tokens) | epochs over its data | valid loss | "
                  "kept step | wall time (s) | GPU-hours |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m, t in bud["models"].items():
            share = f"{fmt(t.get('share'), 3)} → {fmt(t.get('effective_share'), 3)}" if t.get("share") is not None else "–"
            lines.append(f"| {m} | {share} | {fmt(t.get('tokens_seen'))} | {fmt(t.get('steps'))} | "
                         f"{fmt(t.get('global_batch_tokens'))} | {fmt(t.get('epochs'))} | {fmt(t.get('valid_loss'), 4)} | "
                         f"{fmt(t.get('kept_step'))} | {fmt(t.get('wall_time_s'), 1)} | {fmt(t.get('gpu_hours'), 4)} |")
        lines += ["", "Kept step: the overfitting guard keeps the evaluated weights of lowest validation loss (the "
                  "same rule for seed, dense and experts); it equals `steps` when the last weights were best.", ""]
        lines += _figure(report, "training_curves.png", "training curves")
        lines += ["Every trained model also has TensorBoard event files (`<model folder>/tensorboard/`, written "
                  f"while it trains): `tensorboard --logdir {run.get('run_dir')}`.", ""]
    lines += _merges_markdown(report)
    if report["timings"]:
        lines += ["## Timings", "", "| stage | runs | wall time (s) |", "|---|---:|---:|"]
        for stage, t in report["timings"].items():
            lines.append(f"| {stage} | {t.get('runs')} | {fmt(t.get('wall_time_s'), 1)} |")
        lines.append("")
    return "\n".join(lines)


def _figure(report: dict, name: str, alt: str) -> list[str]:
    """The markdown lines embedding `figures/<name>`, when the report drew it."""
    return [f"![{alt}](figures/{name})", ""] if f"figures/{name}" in report.get("figures", []) else []


def _nearest(cl: dict, c: int) -> str:
    per = cl.get("clusters") or []
    docs = per[c].get("nearest_documents") if c < len(per) and isinstance(per[c], dict) else None
    if not docs:
        return "–"
    return "nearest: " + str(docs[0].get("text", ""))[:80].replace("|", "/").replace("\n", " ")


def _num(s: str):
    return (0, int(s)) if str(s).isdigit() else (1, str(s))


# ---- merges: parameter merges and the BTX MoE ----------------------------------------------------------------
def _merges(m: dict, budgets: dict) -> dict:
    """The merge recipes and the MoE's routing statistics, per layer (see the schema above)."""
    params = {name: {k: meta.get(k) for k in ("recipe", "weights", "lambda_search")}
              for name, meta in (m.get("parameter") or {}).items() if meta}
    failed = dict(m.get("failed") or {})
    moe = m.get("moe") or {}
    if not moe or "moe" in failed:
        return {"parameter": params, "moe": None, "failed": failed}
    build, routing, training = moe.get("build") or {}, moe.get("routing") or {}, moe.get("training") or {}
    budget = ((budgets.get("plan") or {}).get("train_tokens")) or None
    tokens = training.get("tokens_seen")
    entropy, mean_entropy = routing.get("per_token_entropy") or [], routing.get("mean_router_entropy") or []
    per_layer = [{"layer": i, "per_token_entropy": entropy[i] if i < len(entropy) else None,
                  "mean_router_entropy": mean_entropy[i] if i < len(mean_entropy) else None, "load": load}
                 for i, load in enumerate(routing.get("per_expert_load") or [])]
    return {"parameter": params, "failed": failed, "moe": {
        "shared": build.get("shared"), "router_init": build.get("router_init"),
        "router": (build.get("router") or {}).get("method"), "top_k": build.get("top_k"),
        "num_local_experts": build.get("num_local_experts"), "finetune_tokens": tokens,
        "extra_tokens_fraction": tokens / budget if tokens and budget else None,
        "routing": {"tokens": routing.get("tokens"), "max_entropy": routing.get("max_entropy"),
                    "per_layer": per_layer} if routing else None}}


def _merges_markdown(report: dict) -> list[str]:
    merges, ppl = report.get("merges") or {}, report.get("perplexity") or {}
    params, moe, failed = merges.get("parameter") or {}, merges.get("moe"), merges.get("failed") or {}
    if not params and not moe and not failed:
        return []

    def test(m):
        return ((ppl.get(m) or {}).get("test") or {}).get("perplexity")

    def ratio(a, b):
        return fmt(a / b) + "×" if a and b else "–"

    lines = ["## Merges", ""]
    for name, f in failed.items():
        lines += [f"**{name} failed** and is missing from this report: {f.get('error')}. Fix: {f.get('fix')}.", ""]
    params = {k: v for k, v in params.items() if k not in failed}
    if params:
        lines += [f"One static model each; test perplexity of dense {fmt(test('dense'))}, seed {fmt(test('seed'))}. "
                  "λ scales the merged task vector (θ = θ_seed + λ·τ; λ = 1 with these weights is the plain average);"
                  " 'auto' picks it on the valid shards, so report the test column.", "",
                  "| merge | recipe | expert weights | λ search (valid NLL) | test ppl | × dense | × average |",
                  "|---|---|---|---|---:|---:|---:|"]
        for name, r in params.items():
            recipe = ", ".join(f"{k} {v}" for k, v in (r.get("recipe") or {}).items()) or "–"
            weights = ", ".join(f"{w:.2f}" for w in r.get("weights") or []) or "–"
            search = ", ".join(f"{k}: {v:.3f}" for k, v in (r.get("lambda_search") or {}).items()) or "–"
            lines.append(f"| {name} | {recipe} | {weights} | {search} | {fmt(test(name))} | "
                         f"{ratio(test(name), test('dense'))} | {ratio(test(name), test('average'))} |")
        lines.append("")
    if moe:
        frac = moe.get("extra_tokens_fraction")
        lines += [f"BTX MoE: {moe.get('num_local_experts')} experts per layer, top-{moe.get('top_k')}, router "
                  f"{moe.get('router') or moe.get('router_init')}, attention / norms / embeddings from: {moe.get('shared')}. "
                  f"Test perplexity {fmt(test('moe'))} ({ratio(test('moe'), test('ensemble_top2'))} the c-BTM top-2 "
                  f"ensemble, {ratio(test('moe'), test('dense'))} dense"
                  + (f", {ratio(test('moe'), test(DENSE_MOE_COMPUTE))} the dense model given the same extra "
                     f"tokens, `{DENSE_MOE_COMPUTE}` {fmt(test(DENSE_MOE_COMPUTE))}" if test(DENSE_MOE_COMPUTE)
                     else "") + ").", ""]
        if moe.get("finetune_tokens"):
            lines += [f"**Extra compute:** the MoE finetune read {moe['finetune_tokens']} tokens beyond the "
                      f"compute-matched budget (+{100 * frac:.0f}% of it), which c-BTM and dense do not get"
                      + (f"; `{DENSE_MOE_COMPUTE}` is dense given them too." if test(DENSE_MOE_COMPUTE) else ".")
                      if frac
                      else f"**Extra compute:** the MoE finetune read {moe['finetune_tokens']} tokens beyond the "
                      "compute-matched budget.", ""]
        routing = moe.get("routing") or {}
        layers = routing.get("per_layer") or []
        if layers:
            n_e = max(len(r.get("load") or []) for r in layers)
            lines += [f"Routing over {routing.get('tokens')} validation tokens (entropies in nats; uniform routing "
                      f"is {fmt(routing.get('max_entropy'))}):", "",
                      "| layer | per-token entropy | entropy of the mean routing | "
                      + " | ".join(f"load e{e}" for e in range(n_e)) + " |", "|---:|---:|---:|" + "---:|" * n_e]
            for r in layers:
                load = r.get("load") or []
                lines.append(f"| {r['layer']} | {fmt(r.get('per_token_entropy'), 3)} | "
                             f"{fmt(r.get('mean_router_entropy'), 3)} | " + " | ".join(fmt(x, 3) for x in load) + " |")
            lines.append("")
            lines += _figure(report, "moe_routing.png", "MoE routing load and entropy")
    return lines

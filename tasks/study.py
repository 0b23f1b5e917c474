"""A study over a grid of c-BTM runs: `study.json`, `study.md` and figures comparing every point with its
compute-matched dense model.

`write_study(out_dir, points, grid, settings=None, run_dir=None)` writes into `out_dir` (atomically)
`study.json`, `study.md` and `figures/*.png`, and returns the study.json dict.

Each point is one trained setting of the grid:
```
{"name": str, "axes": {axis: value, ...},            # always "num_clusters" and "train_tokens"; k = 1 is dense
 "variants": {top-k value: ensemble model name},      # the c-BTM variants that apply to this point
 "perplexity": {model: {"valid": evaluate_perplexity result, "test": ...}},
 "training": {model: training.json dict},             # seed, dense, expert_*, moe (what the point trained)
 "report_dir": str | None}                            # the point's own report folder, linked from study.md
```
`grid` is {axis: [values]} in the order given (the first value of an axis other than num_clusters/train_tokens
is the "primary" one the figures hold fixed); its `top_k` values name the c-BTM variants.

study.json (schema version 1):
```
{"schema_version": 1, "created", "run_dir", "grid", "settings",
 "points": [{"name", "axes", "dense_only", "report_dir", "variants",
             "test": {model: ppl}, "valid": {model: ppl}, "ratio_to_dense": {model: test ppl / dense test ppl},
             "ratio_interval": {model: [low, high]: 95% paired bootstrap of that ratio over the test documents},
             "per_label": {model: {label: test ppl}},
             "compute": {"models": {model: {"tokens", "steps", "global_batch_tokens", "gpu_hours", "wall_time_s",
                                            "epochs"}},
                         "totals": {"cbtm_tokens", "dense_tokens", "cbtm_gpu_hours", "dense_gpu_hours",
                                    "cbtm_wall_time_s", "dense_wall_time_s", "moe_tokens"}}}],
 "methods": [column names: "top-<t>" for the c-BTM variants, then the other merged models],
 "table": [{**axes, "method", "test_ppl", "dense_ppl", "ratio_to_dense"}],   # the main table, flat
 "headlines": [one sentence per budget], "figures": [relative png paths]}
```
A method's ratio is taken against the dense model of the same point (trained from the same seed with the same
budget), so it is the compute-matched comparison whatever the grid. Every headline ratio carries its 95%
paired-bootstrap interval over the test documents (`tasks.bootstrap`; both models of a comparison score the same
documents); one whose interval contains 1 reads "no difference beyond noise".
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from corpus.io import atomic_dir, write_json
from corpus.layout import STUDY_JSON, STUDY_MD
from experts.run_models import DENSE_MOE_COMPUTE, is_ensemble, is_expert
from tasks.bootstrap import describe_change, ratio_interval
from tasks.report import fmt

SCHEMA_VERSION = 1
K, BUDGET = "num_clusters", "train_tokens"
NOT_METHODS = ("seed", "dense")  # plus expert_* and ensemble_top* (the latter appear as top-k columns)


# ---- summaries ------------------------------------------------------------------------------------------------
def _ppl(result: dict | None, split: str) -> float | None:
    r = (result or {}).get(split) or {}
    return r.get("perplexity")


def _per_label(result: dict | None) -> dict[str, float]:
    r = (result or {}).get("test") or {}
    return {str(k): (v.get("perplexity") if isinstance(v, dict) else v) for k, v in (r.get("per_label") or {}).items()}


def _compute(training: dict[str, dict]) -> dict:
    """Tokens, steps, global batch, GPU-hours and wall time per trained model, and c-BTM vs dense totals."""
    models = {}
    for m, t in training.items():
        if not t:
            continue
        models[m] = {"tokens": t.get("tokens_seen"), "steps": t.get("steps"),
                     "global_batch_tokens": (t.get("plan") or {}).get("tokens_per_step"),
                     "gpu_hours": t.get("gpu_hours"), "wall_time_s": t.get("wall_time_s"), "epochs": t.get("epochs")}

    def total(names, key):
        return sum((models.get(m) or {}).get(key) or 0 for m in names)

    experts = [m for m in models if is_expert(m)]
    totals = {
        "cbtm_tokens": total(["seed"] + experts, "tokens") if experts else None,
        "dense_tokens": total(["seed", "dense"], "tokens"),
        "cbtm_gpu_hours": total(["seed"] + experts, "gpu_hours") if experts else None,
        "dense_gpu_hours": total(["seed", "dense"], "gpu_hours"),
        "cbtm_wall_time_s": total(["seed"] + experts, "wall_time_s") if experts else None,
        "dense_wall_time_s": total(["seed", "dense"], "wall_time_s"),
        "moe_tokens": (models.get("moe") or {}).get("tokens"),
        "dense_moe_compute_tokens": total(["seed", "dense", DENSE_MOE_COMPUTE], "tokens")
        if DENSE_MOE_COMPUTE in models else None,
    }
    return {"models": models, "totals": totals}


def summarize_point(point: dict) -> dict:
    """One point of the study.json `points` list (see the module docstring)."""
    ppl = point.get("perplexity") or {}
    test = {m: _ppl(r, "test") for m, r in ppl.items()}
    dense = test.get("dense")
    dense_test = (ppl.get("dense") or {}).get("test")
    intervals = {m: ratio_interval(r.get("test") or {}, dense_test) for m, r in ppl.items() if dense_test and m != "dense"}
    return {
        "name": point.get("name") or " ".join(f"{a}={v}" for a, v in point["axes"].items()),
        "axes": dict(point["axes"]),
        "dense_only": point["axes"].get(K) == 1,
        "report_dir": point.get("report_dir"),
        "variants": dict(point.get("variants") or {}),
        "test": test,
        "valid": {m: _ppl(r, "valid") for m, r in ppl.items()},
        "ratio_to_dense": {m: (v / dense if v and dense else None) for m, v in test.items()},
        "ratio_interval": {m: [ci["low"], ci["high"]] for m, ci in intervals.items() if ci},
        "per_label": {m: _per_label(r) for m, r in ppl.items()},
        "compute": _compute(point.get("training") or {}),
    }


def _variant_label(t: str) -> str:
    return f"top-{t}"


def _methods(points: list[dict], grid: dict) -> list[str]:
    """Columns of the main table: the c-BTM top-k variants of the grid, then every other merged model present."""
    cols = [_variant_label(t) for t in grid.get("top_k", []) if any(t in p["variants"] for p in points)]
    for p in points:
        for m in p["test"]:
            if m not in NOT_METHODS and not is_expert(m) and not is_ensemble(m) and m not in cols:
                cols.append(m)
    return cols


def _model(point: dict, method: str) -> str | None:
    """The model name of a main-table column in one point (None when it does not apply, e.g. top-4 with k = 2)."""
    if method.startswith("top-"):
        return point["variants"].get(method[4:])
    return method if method in point["test"] else None


def _value(point: dict, method: str, key: str = "test") -> float | None:
    m = _model(point, method)
    return point[key].get(m) if m else None


def _series_axes(grid: dict) -> list[str]:
    """Axes other than k, the budget and top-k: they split a budget's points into series (e.g. clusterer)."""
    return [a for a in grid if a not in (K, BUDGET, "top_k")]


def _primary(point: dict, grid: dict) -> bool:
    """The point holds the first value of every series axis (or is a dense point, which ignores them)."""
    return point["dense_only"] or all(point["axes"].get(a) == grid[a][0] for a in _series_axes(grid))


def _budgets(points: list[dict], grid: dict) -> list:
    return list(grid.get(BUDGET) or dict.fromkeys(p["axes"].get(BUDGET) for p in points))


def _in_budget(points, budget) -> list[dict]:
    return [p for p in points if p["axes"].get(BUDGET) == budget]


def _headline_variant(grid: dict, k: int) -> str | None:
    tops = grid.get("top_k") or []
    if "2" in tops and k >= 2:
        return _variant_label("2")
    return _variant_label(tops[0]) if tops else None


def _table(points: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    for p in points:
        dense = p["test"].get("dense")
        if p["dense_only"]:
            rows.append({**p["axes"], "method": "dense", "test_ppl": dense, "dense_ppl": dense, "ratio_to_dense": 1.0})
            continue
        for m in methods:
            v = _value(p, m)
            if v is not None:
                rows.append({**p["axes"], "method": m, "test_ppl": v, "dense_ppl": dense,
                             "ratio_to_dense": v / dense if dense else None})
    return rows


def _headlines(points: list[dict], grid: dict, methods: list[str], raw: dict[str, dict] | None = None) -> list[str]:
    """One sentence per budget: the largest k's c-BTM (top-2, or the first top-k) against dense, the best method,
    and each other series value (e.g. random clusters) against the primary one, each with its paired-bootstrap
    interval (`raw`: {point name: its perplexity results}, for the comparison across points)."""
    raw = raw or {}

    def vs_dense(p, model, r):
        lo_hi = p.get("ratio_interval", {}).get(model)
        ci = {"ratio": r, "low": lo_hi[0], "high": lo_hi[1], "level": 0.95,
              "beyond_noise": lo_hi[0] > 1 or lo_hi[1] < 1} if lo_hi else None
        return describe_change(ci, r)

    out = []
    for budget in _budgets(points, grid):
        pts = [p for p in _in_budget(points, budget) if not p["dense_only"]]
        if not pts:
            dense = [p for p in _in_budget(points, budget) if p["dense_only"]]
            if dense:
                out.append(f"**{_tokens(budget)} tokens**: dense only, test perplexity {fmt(dense[0]['test'].get('dense'))}.")
            continue
        prim = [p for p in pts if _primary(p, grid)] or pts
        top = max(prim, key=lambda p: p["axes"][K])
        k = top["axes"][K]
        parts = []
        hv = _headline_variant(grid, k)
        r = top["ratio_to_dense"].get(_model(top, hv)) if hv else None
        if r is not None:
            parts.append(f"k={k} {hv} vs dense: {vs_dense(top, _model(top, hv), r)}")
        best = min(((p["ratio_to_dense"].get(_model(p, m)), p, m) for p in pts for m in methods
                    if _model(p, m) and p["ratio_to_dense"].get(_model(p, m)) is not None),
                   key=lambda x: x[0], default=None)
        if best:
            r, p, m = best
            where = ", ".join([f"k={p['axes'][K]}"] + [f"{a} {p['axes'][a]}" for a in _series_axes(grid)
                                                       if len(grid[a]) > 1])
            parts.append(f"best: {m} ({where}) {vs_dense(p, _model(p, m), r)}")
        for a in _series_axes(grid):
            for v in grid[a][1:]:
                other = [p for p in pts if p["axes"][K] == k and p["axes"].get(a) == v
                         and all(p["axes"].get(b) == grid[b][0] for b in _series_axes(grid) if b != a)]
                if other and hv:
                    mine, theirs = _value(top, hv), _value(other[0], hv)
                    if mine and theirs:
                        ci = ratio_interval(((raw.get(other[0]["name"]) or {}).get(_model(other[0], hv)) or {}).get("test"),
                                            ((raw.get(top["name"]) or {}).get(_model(top, hv)) or {}).get("test"))
                        parts.append(f"{a} {v} vs {grid[a][0]} (k={k} {hv}): {describe_change(ci, theirs / mine)}")
        for p in sorted(pts, key=lambda p: p["axes"][K]):  # the MoE against dense at its own compute
            moe, eq = p["test"].get("moe"), p["test"].get(DENSE_MOE_COMPUTE)
            if moe and eq:
                parts.append(f"k={p['axes'][K]} moe vs {DENSE_MOE_COMPUTE} (dense given the MoE's extra tokens): "
                             f"{_pct(moe / eq)}")
        out.append(f"**{_tokens(budget)} tokens**: " + ("; ".join(parts) if parts else "no c-BTM result") + ".")
    return out


# ---- formatting -------------------------------------------------------------------------------------------------
def _pct(ratio: float) -> str:
    """0.959 → '−4.1%' (negative = lower perplexity than dense = better)."""
    return f"{(ratio - 1) * 100:+.1f}%".replace("-", "−")


def _span(values: list) -> str:
    v = sorted({x for x in values if x is not None})
    return "–" if not v else str(v[0]) if len(v) == 1 else f"{v[0]}–{v[-1]}"


def _run_cell(runs: list[dict]) -> str:
    """'25M (1000 × 25k)': tokens (steps × global batch) of one model, or Σ tokens (ranges) of several."""
    if not runs:
        return "–"
    tokens = sum(r.get("tokens") or 0 for r in runs)
    return (f"{_tokens(tokens)} ({_span([r.get('steps') for r in runs])} × "
            f"{_span([r.get('global_batch_tokens') for r in runs])})")


def _t(n: Any) -> str:
    return "–" if n is None else _tokens(n)


def _tokens(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return str(n)
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.4g}{unit}"
    return str(n)


# ---- markdown -----------------------------------------------------------------------------------------------------
def render_markdown(study: dict) -> str:
    grid, points, methods = study["grid"], study["points"], study["methods"]
    series = [a for a in _series_axes(grid) if len(grid[a]) > 1]
    lines = ["# c-BTM study", "",
             f"Run folder `{study.get('run_dir')}`, written {study.get('created')}. Grid: "
             + ", ".join(f"`--{a.replace('_', '-')} {','.join(str(v) for v in vals)}`" for a, vals in grid.items())
             + f" ({len(points)} trained points). Every ratio compares a model with the dense model trained from the "
             "same seed with the same total training tokens (k = 1 is that dense model); lower is better.", ""]
    settings = study.get("settings") or {}
    keys = ("corpus", "seed_model", "model_size", "seed_fraction", "embedder", "batch_tokens", "learning_rate",
            "merge_methods", "posterior_top_k")
    shown = [f"`--{k.replace('_', '-')} {settings[k]}`" for k in keys if k in settings]
    if shown:
        lines += ["Shared settings: " + ", ".join(shown) + ".", ""]
    lines += ["## Headlines", ""] + [f"- {h}" for h in study["headlines"]] + [""]

    lines += ["## Test perplexity (ratio to dense)", ""]
    for budget in _budgets(points, grid):
        pts = sorted(_in_budget(points, budget), key=lambda p: (not p["dense_only"], p["axes"].get(K)))
        if not pts:
            continue
        lines += [f"### {_tokens(budget)} training tokens", "",
                  "| k | " + "".join(f"{a} | " for a in series) + "dense | " + " | ".join(methods) + " |",
                  "|---:|" + "---|" * len(series) + "---:|" + "---:|" * len(methods)]
        for p in pts:
            cells = [fmt(p["test"].get("dense"))]
            for m in methods:
                v, r = _value(p, m), p["ratio_to_dense"].get(_model(p, m) or "")
                cells.append(f"{fmt(v)} ({r:.3f}×)" if v is not None and r is not None else fmt(v))
            axes = ["–" if p["dense_only"] else str(p["axes"].get(a)) for a in series]
            lines.append(f"| {p['axes'].get(K)} | " + "".join(f"{a} | " for a in axes) + " | ".join(cells) + " |")
        lines.append("")
    figures = study.get("figures") or []
    captions = {
        "ppl_vs_k.png": "Test perplexity vs number of experts (k = 1: the dense model; grey dashes: each point's "
                        "compute-matched dense model).",
        "ppl_vs_top_k.png": "c-BTM ensemble: ratio to dense vs experts used per context (top-k).",
        "methods.png": "Every merge method: ratio to dense per k.",
        "domains.png": "Per-domain test perplexity as a ratio to dense (blue: better than dense).",
    }
    for fig in figures:
        name = Path(fig).name
        cap = captions.get(name) or (f"{name[len('compare_'):-4]}: c-BTM ratio to dense per k and value."
                                     if name.startswith("compare_") else name)
        lines += [f"![{Path(fig).stem}]({fig})", "", f"*{cap}*", ""]

    lines += ["## Compute accounting", "",
              "Tokens actually trained, as tokens (optimizer steps × global batch in tokens; ranges over the experts); "
              "c-BTM = seed + all experts, dense = seed + dense (BTX MoE finetuning comes on top of c-BTM). "
              "GPU-hours are 0 on CPU; wall time is summed over models.",
              "",
              "| budget | k | " + "".join(f"{a} | " for a in series)
              + "seed | dense | experts (Σ) | c-BTM total | dense total | c-BTM GPU-h | dense GPU-h | c-BTM wall s "
                "| dense wall s | MoE finetune |",
              "|---:|---:|" + "---|" * len(series) + "---:|" * 10]
    budgets = _budgets(points, grid)
    for p in sorted(points, key=lambda p: (budgets.index(p["axes"].get(BUDGET)), p["axes"].get(K))):
        c, t = p["compute"]["models"], p["compute"]["totals"]
        experts = [v for m, v in c.items() if is_expert(m)]
        axes = ["–" if p["dense_only"] else str(p["axes"].get(a)) for a in series]
        lines.append(
            f"| {_tokens(p['axes'].get(BUDGET))} | {p['axes'].get(K)} | " + "".join(f"{a} | " for a in axes)
            + f"{_run_cell([c['seed']] if 'seed' in c else [])} | {_run_cell([c['dense']] if 'dense' in c else [])} | "
            f"{_run_cell(experts)} | {_t(t.get('cbtm_tokens'))} | {_t(t.get('dense_tokens'))} | "
            f"{fmt(t.get('cbtm_gpu_hours'), 3)} | {fmt(t.get('dense_gpu_hours'), 3)} | {fmt(t.get('cbtm_wall_time_s'), 0)} | "
            f"{fmt(t.get('dense_wall_time_s'), 0)} | {_run_cell([c['moe']] if 'moe' in c else [])} |")
    lines.append("")
    reports = [p for p in points if p.get("report_dir")]
    if reports:
        lines += ["## Points", "", "Each trained point's own report (clusters, per-cluster perplexity, few-shot, "
                  "budgets, timings):", ""]
        for p in reports:
            lines.append(f"- {p['name']}: [{Path(p['report_dir']).name}/report.md]"
                         f"(../{Path(p['report_dir']).name}/report.md)")
        lines.append("")
    return "\n".join(lines)


# ---- figures --------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(n: int, width: float = 5.0, height: float = 3.8):
    plt = _plt()
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return plt, fig, list(axes[0])


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"figures/{path.name}"


def _budget_panels(points, grid):
    """(budget, its primary-series points with k > 1 sorted by k, its dense point or None) for budgets with c-BTM."""
    out = []
    for b in _budgets(points, grid):
        pts = _in_budget(points, b)
        experts = sorted((p for p in pts if not p["dense_only"] and _primary(p, grid)), key=lambda p: p["axes"][K])
        dense = next((p for p in pts if p["dense_only"]), None)
        if experts:
            out.append((b, experts, dense))
    return out


def _fig_ppl_vs_k(points, grid, methods, path: Path) -> str | None:
    panels = _budget_panels(points, grid)
    if not panels:
        return None
    plt, fig, axs = _panels(len(panels))
    for ax, (budget, pts, dense) in zip(axs, panels):
        d1 = dense["test"].get("dense") if dense else None
        denses = [p["test"].get("dense") for p in pts if p["test"].get("dense")] + ([d1] if d1 else [])
        cap = 1.3 * max(denses) if denses else float("inf")  # a method far above dense would flatten the rest
        shown = []
        for m in methods:
            xs = [p["axes"][K] for p in pts if _value(p, m) is not None]
            ys = [_value(p, m) for p in pts if _value(p, m) is not None]
            if d1 is not None:
                xs, ys = [1] + xs, [d1] + ys
            if len(xs):
                off = max(ys) > cap
                ax.plot(xs, ys, marker="o", label=f"{m} (off scale, max {max(ys):.1f})" if off else m)
                shown += [y for y in ys if y <= cap]
        ax.plot([p["axes"][K] for p in pts], [p["test"].get("dense") for p in pts], ls="--", color="grey",
                marker="x", label="dense (same point)")
        shown += denses
        if shown:
            pad = 0.06 * (max(shown) - min(shown) or 1.0)
            ax.set_ylim(min(shown) - pad, max(shown) + pad)
        if d1 is not None:
            ax.scatter([1], [d1], marker="*", s=160, color="black", zorder=5, label="dense (k = 1)")
        ks = sorted({1} if d1 is not None else set()) + [p["axes"][K] for p in pts]
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("k (number of experts)")
        ax.set_ylabel("test perplexity")
        ax.set_title(f"{_tokens(budget)} training tokens")
        ax.grid(alpha=0.3)
    axs[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(plt, fig, path)


def _fig_top_k(points, grid, path: Path) -> str | None:
    tops = grid.get("top_k") or []
    panels = _budget_panels(points, grid)
    if len(tops) < 2 or not panels:
        return None
    plt, fig, axs = _panels(len(panels))
    for ax, (budget, pts, _) in zip(axs, panels):
        for p in pts:
            xs = [i for i, t in enumerate(tops) if p["ratio_to_dense"].get(p["variants"].get(t) or "") is not None]
            ax.plot(xs, [p["ratio_to_dense"][p["variants"][tops[i]]] for i in xs], marker="o", label=f"k={p['axes'][K]}")
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set_xticks(range(len(tops)), tops)
        ax.set_xlabel("top-k (experts per context)")
        ax.set_ylabel("test perplexity / dense")
        ax.set_title(f"c-BTM ensemble, {_tokens(budget)} tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _fig_compare(points, grid, axis: str, path: Path) -> str | None:
    """Grouped bars: ratio to dense of the headline c-BTM variant per k, one bar per value of `axis` (others at
    their first value)."""
    import numpy as np

    values = grid[axis]
    budgets = [b for b in _budgets(points, grid) if any(not p["dense_only"] for p in _in_budget(points, b))]
    if len(values) < 2 or not budgets:
        return None
    plt, fig, axs = _panels(len(budgets))
    others = [a for a in _series_axes(grid) if a != axis]
    for ax, budget in zip(axs, budgets):
        pts = [p for p in _in_budget(points, budget) if not p["dense_only"]
               and all(p["axes"].get(a) == grid[a][0] for a in others)]
        ks = sorted({p["axes"][K] for p in pts})
        width = 0.8 / len(values)
        hv = _headline_variant(grid, max(ks)) if ks else None
        for i, v in enumerate(values):
            ys = []
            for k in ks:
                p = next((q for q in pts if q["axes"][K] == k and q["axes"].get(axis) == v), None)
                ys.append((p["ratio_to_dense"].get(_model(p, hv) or "") if p and hv else None) or np.nan)
            ax.bar(np.arange(len(ks)) + (i - (len(values) - 1) / 2) * width, ys, width, label=f"{axis} {v}")
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set_xticks(range(len(ks)), [f"k={k}" for k in ks])
        ax.set_ylabel(f"c-BTM {hv} perplexity / dense")
        ax.set_title(f"{_tokens(budget)} training tokens")
        _zoom(ax)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _fig_methods(points, grid, methods, path: Path) -> str | None:
    import numpy as np

    panels = _budget_panels(points, grid)
    if not panels or not methods:
        return None
    plt, fig, axs = _panels(len(panels), width=max(5.0, 0.9 * len(methods) + 2))
    for ax, (budget, pts, _) in zip(axs, panels):
        width = 0.8 / len(pts)
        for i, p in enumerate(pts):
            ys = [(p["ratio_to_dense"].get(_model(p, m) or "")) for m in methods]
            ax.bar(np.arange(len(methods)) + (i - (len(pts) - 1) / 2) * width,
                   [np.nan if y is None else y for y in ys], width, label=f"k={p['axes'][K]}")
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_ylabel("test perplexity / dense")
        ax.set_title(f"Merge methods, {_tokens(budget)} tokens")
        _zoom(ax)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _zoom(ax, cap: float = 1.3) -> None:
    """Ratios near 1 are unreadable on an axis from 0, and one bad method (e.g. averaging) would flatten the rest:
    the axis spans the bars up to `cap`, and a bar cut off there is labelled with its value."""
    import numpy as np

    bars = [r for r in ax.patches if np.isfinite(r.get_height())]
    heights = [r.get_height() for r in bars]
    if not heights:
        return
    lo, hi = min(heights + [1.0]), min(max(heights + [1.0]), cap)
    pad = 0.08 * (hi - lo or 0.1)
    ax.set_ylim(max(0.0, lo - pad), hi + pad)
    for r in bars:
        if r.get_height() > hi + pad:
            ax.text(r.get_x() + r.get_width() / 2, hi + pad * 0.5, f"{r.get_height():.2f}", ha="center", va="top",
                    fontsize=6, rotation=90, color="white")


def _fig_domains(points, grid, methods, path: Path) -> str | None:
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    panels = []
    for budget, pts, _ in _budget_panels(points, grid):
        labels = sorted({lab for p in pts for lab in p["per_label"].get("dense", {})})
        rows, data = [], []
        for p in pts:
            dense = p["per_label"].get("dense") or {}
            for m in methods:
                model = _model(p, m)
                per = p["per_label"].get(model) if model else None
                if not per:
                    continue
                rows.append(f"k={p['axes'][K]} {m}")
                data.append([per[lab] / dense[lab] if per.get(lab) and dense.get(lab) else np.nan for lab in labels])
        if rows and labels:
            panels.append((budget, labels, rows, np.array(data)))
    if not panels:
        return None
    n_rows = max(len(r) for _, _, r, _ in panels)
    n_cols = max(len(lab) for _, lab, _, _ in panels)
    plt, fig, axs = _panels(len(panels), width=2.0 + 0.9 * n_cols, height=1.5 + 0.32 * n_rows)
    for ax, (budget, labels, rows, data) in zip(axs, panels):
        finite = data[np.isfinite(data)]
        # symmetric in ratio (1/m .. m), saturating at 1.5× so that one bad method does not wash out the rest
        m = float(np.clip(np.max(np.maximum(finite, 1 / finite)), 1.05, 1.5)) if finite.size else 1.5
        im = ax.imshow(data, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=1.0, vmin=1 / m, vmax=m), aspect="auto")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        if data.size <= 600:
            for i in range(data.shape[0]):
                for j in range(data.shape[1]):
                    if np.isfinite(data[i, j]):
                        dark = abs(np.log(data[i, j])) > 0.6 * np.log(m)
                        ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if dark else "black")
        ax.set_title(f"Per domain / dense, {_tokens(budget)} tokens")
        fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(plt, fig, path)


# ---- entry point --------------------------------------------------------------------------------------------
def write_study(out_dir: str | os.PathLike, points: list[dict], grid: dict[str, list], settings: dict | None = None,
                run_dir: str | None = None) -> dict:
    """Write `out_dir/{study.json, study.md, figures/*.png}` (atomically) and return the study.json dict."""
    summaries = [summarize_point(p) for p in points]
    grid = {a: list(v) for a, v in grid.items()}
    methods = _methods(summaries, grid)
    study = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run_dir": run_dir,
        "grid": grid,
        "settings": settings or {},
        "points": summaries,
        "methods": methods,
        "table": _table(summaries, methods),
        "headlines": _headlines(summaries, grid, methods,
                                {s["name"]: p.get("perplexity") or {} for s, p in zip(summaries, points)}),
        "figures": [],
    }
    with atomic_dir(out_dir) as tmp:
        figures = tmp / "figures"
        figures.mkdir()
        made = [_fig_ppl_vs_k(summaries, grid, methods, figures / "ppl_vs_k.png"),
                _fig_top_k(summaries, grid, figures / "ppl_vs_top_k.png")]
        made += [_fig_compare(summaries, grid, a, figures / f"compare_{a}.png") for a in _series_axes(grid)]
        made += [_fig_methods(summaries, grid, methods, figures / "methods.png"),
                 _fig_domains(summaries, grid, methods, figures / "domains.png")]
        study["figures"] = [f for f in made if f]
        write_json(tmp / STUDY_JSON, study)
        (tmp / STUDY_MD).write_text(render_markdown(study), encoding="utf-8")
    return study

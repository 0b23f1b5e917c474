"""The report's figures, drawn from report.json's sections (and the training.json curves) by `tasks.report`.

Each `*_figure(..., path)` writes one PNG and returns its path relative to the report folder (`figures/x.png`),
or None when there is nothing to draw. Every figure colours a model with `model_colours`, so a model has one
colour throughout the report and no two models share one; expert j has cluster j's colour
(`corpus.palette`), as in the cluster plots.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from corpus.palette import distinct_colours  # noqa: E402
from experts.run_models import DENSE, ORACLE, SEED, expert_cluster, is_expert  # noqa: E402

BASELINES = {DENSE: "#000000", SEED: "#8c8c8c", ORACLE: "#c8c8c8"}


def model_colours(models: list[str]) -> dict[str, str]:
    """A distinct colour per model: dense black, seed and oracle greys, `expert_<j>` cluster j's colour, the
    others the next colours of `corpus.palette.distinct_colours`; no two models share one."""
    experts = {m: expert_cluster(m) for m in models if expert_cluster(m) is not None}
    others = [m for m in models if m not in BASELINES and m not in experts]
    n = max(experts.values(), default=-1) + 1
    colours = distinct_colours(n + len(others))
    return {**{m: BASELINES[m] for m in models if m in BASELINES}, **{m: colours[j] for m, j in experts.items()},
            **dict(zip(others, colours[n:]))}


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"figures/{path.name}"


def _test_ppl(ppl: dict, m: str):
    return ((ppl.get(m) or {}).get("test") or {}).get("perplexity")


def perplexity_figure(ppl: dict, path: Path, colours: dict) -> str | None:
    """Every model's test perplexity against dense's, in percent (dots on stems from 0 = dense, labelled with the
    difference and the perplexity; a shaded bar: the 95% paired-bootstrap interval of the ratio, when the report
    has it). The axis is linear out to the farthest model that is not a single expert
    and logarithmic beyond, so that dense vs the ensembles stays readable next to the experts' large values.
    Without a dense model: the perplexities on a log axis."""
    models = [m for m in ppl if _test_ppl(ppl, m)]
    if not models:
        return None
    dense = _test_ppl(ppl, "dense")
    fig, ax = plt.subplots(figsize=(7.5, 0.3 * len(models) + 1.4))
    y = np.arange(len(models))[::-1]
    if dense:
        diff = [100 * (_test_ppl(ppl, m) / dense - 1) for m in models]
        # linear out to the ensembles and merges near dense (within ±30%), on a 1-2-5 number; log beyond
        near = [abs(d) for m, d in zip(models, diff) if not is_expert(m) and abs(d) <= 30]
        linear = _nice_ceil(max(1.0, 1.2 * max(near, default=1.0)))
        ax.set_xscale("symlog", linthresh=linear, linscale=2)
        ax.hlines(y, 0, diff, color=[colours[m] for m in models], lw=2)
        ax.scatter(diff, y, color=[colours[m] for m in models], s=25, zorder=3)
        for yi, m in zip(y, models):  # the paired-bootstrap interval of the ratio (tasks.bootstrap), when known
            ci = ((ppl.get(m) or {}).get("test") or {}).get("vs_dense")
            if ci:
                ax.hlines(yi, 100 * (ci["low"] - 1), 100 * (ci["high"] - 1), color=colours[m], lw=6, alpha=0.35)
        for yi, m, d in zip(y, models, diff):
            what = f"{d:+.1f}%".replace("-", "−") if d < 100 else f"{1 + d / 100:.1f}×"
            ax.text(d, yi + 0.28, f"{what} ({_test_ppl(ppl, m):.2f})", fontsize=6.5, ha="center")
        ax.axvline(0, color="black", lw=0.8)
        lo, hi = min(diff + [0]), max(diff + [0])
        ax.set_xlim(lo - 0.15 * (abs(lo) + linear), hi + 0.5 * (abs(hi) + linear))
        # beyond the linear range: 1-2-5 ticks out to the farthest model, so +5.5% and +8.3% sit between labels
        steps = [m * 10.0 ** e for e in range(0, 6) for m in (1, 2, 5) if 1.4 * linear < m * 10.0 ** e]
        ticks = sorted({0.0, linear, linear / 2, *((-linear / 2, -linear) if lo < 0 else ()),
                        *(d for d in steps if d <= 1.05 * hi), *(-d for d in steps if -d >= 1.05 * lo)})
        scale = ax.xaxis.get_transform()  # keep ticks at least 1/16 of the axis apart (the log side crowds)
        span = abs(float(np.diff(scale.transform(np.array(ax.get_xlim())))[0])) / 16
        kept = []
        for t in sorted(ticks, key=lambda t: (t != 0, abs(t) > linear, abs(t))):  # 0 and the linear ticks first
            if all(abs(float(scale.transform(np.array([t]))[0] - scale.transform(np.array([u]))[0])) >= span
                   for u in kept):
                kept.append(t)
        ticks = sorted(kept)
        ax.set_xticks(ticks, [f"{t:+g}%".replace("-", "−") if t else "0" for t in ticks], fontsize=7)
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_xlabel(f"test perplexity vs dense, % (linear within ±{linear:g}%, log beyond; < 0 beats dense)\n"
                      "shaded: 95% paired-bootstrap interval over the test documents")
        ax.set_title(f"Test perplexity vs dense ({dense:.2f}); label: difference or factor (perplexity)",
                     fontsize=10)
    else:
        values = [_test_ppl(ppl, m) for m in models]
        ax.barh(y, values, color=[colours[m] for m in models], height=0.7)
        ax.set_xscale("log")
        ax.set_xlabel("test perplexity (log scale)")
        ax.set_title("Test perplexity (lower is better)", fontsize=10)
    ax.set_yticks(y, models, fontsize=8)
    ax.set_ylim(-0.7, len(models) - 0.2)
    return _save(fig, path)


def _nice_ceil(x: float) -> float:
    """The smallest of 1, 2, 5 × 10^n that is ≥ x."""
    e = math.floor(math.log10(x))
    return next(m * 10.0 ** e for m in (1, 2, 5, 10) if m * 10.0 ** e >= x - 1e-12)


def cluster_label(c, clusters: dict | None, n_terms: int = 2) -> str:
    """'c3' with, when the report knows them, the cluster's dominant label (and its share) and top terms, one per
    line: the column heading of a per-cluster figure."""
    clusters = clusters or {}
    parts = [f"c{c}"]
    dist = (clusters.get("label_distribution") or {}).get(str(c)) or {}
    if dist:
        top, n = max(dist.items(), key=lambda kv: kv[1])
        parts.append(f"{top} {100 * n / max(1, sum(dist.values())):.0f}%")
    terms = clusters.get("top_terms") or []
    if str(c).isdigit() and int(c) < len(terms) and terms[int(c)]:
        parts.append(", ".join(terms[int(c)][:n_terms]))
    return "\n".join(parts)


def cluster_heatmap(ppl: dict, path: Path, clusters: dict | None = None) -> str | None:
    """Model × cluster heat map of test perplexity on each cluster's documents ÷ dense's on them: blue beats
    dense, red loses; the colour saturates at 0.8× and 1.25× (log scale), the cells print the ratio. Columns are
    headed by `cluster_label` (dominant label and top terms from the report's `clusters`)."""
    info = clusters
    dense = ((ppl.get("dense") or {}).get("test") or {}).get("per_cluster") or {}
    clusters = sorted(dense, key=lambda c: (0, int(c)) if str(c).isdigit() else (1, str(c)))
    models = [m for m in ppl if ((ppl[m].get("test") or {}).get("per_cluster"))]
    if not clusters or not models:
        return None
    ratio = np.full((len(models), len(clusters)), np.nan)
    for i, m in enumerate(models):
        pc = ppl[m]["test"]["per_cluster"]
        for j, c in enumerate(clusters):
            if pc.get(c) and dense.get(c):
                ratio[i, j] = pc[c] / dense[c]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(clusters) + 3), 0.3 * len(models) + 2.0))
    sat = math.log(1.25)
    im = ax.imshow(np.clip(np.log(ratio), -sat, sat), cmap="RdBu_r", norm=TwoSlopeNorm(0, -sat, sat), aspect="auto")
    if len(clusters) * len(models) <= 600:
        for (i, j), r in np.ndenumerate(ratio):
            if np.isfinite(r):
                ax.text(j, i, f"{r:.2f}" if r < 10 else f"{r:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(math.log(r)) > 0.7 * sat else "black")
    ax.set_xticks(range(len(clusters)), [cluster_label(c, info) for c in clusters], fontsize=6.5)
    ax.set_yticks(range(len(models)), models, fontsize=7)
    ax.set_xlabel("cluster of the test documents (dominant label of its train documents; top terms)")
    bar = fig.colorbar(im, ax=ax, ticks=[-sat, -sat / 2, 0, sat / 2, sat])
    bar.ax.set_yticklabels(["≤0.8×", "0.89×", "1×", "1.12×", "≥1.25×"], fontsize=7)
    bar.set_label("test perplexity ÷ dense")
    ax.set_title("Per-cluster test perplexity relative to dense")
    return _save(fig, path)


def routing_matrix(label_distribution: dict, path: Path, label_field: str | None) -> str | None:
    """Label × cluster matrix: the share of each label's (domain's) training documents that the clustering
    routes to each cluster (rows sum to 1), the counts printed in the cells."""
    clusters = sorted(label_distribution, key=lambda c: (0, int(c)) if str(c).isdigit() else (1, str(c)))
    labels = sorted({lab for d in label_distribution.values() if isinstance(d, dict) for lab in d})
    if not clusters or not labels or len(labels) > 50:
        return None
    counts = np.array([[(label_distribution[c] or {}).get(lab, 0) for c in clusters] for lab in labels], float)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(clusters) + 3), 0.35 * len(labels) + 1.6))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    if counts.size <= 600:
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, f"{int(n)}", ha="center", va="center", fontsize=6,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(clusters)), [f"c{c}" for c in clusters], fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("cluster_id")
    ax.set_ylabel(f"label ({label_field})" if label_field else "label")
    fig.colorbar(im, ax=ax, label="share of the label's train documents")
    ax.set_title("Routing of each label's train documents to clusters (cell: documents)", fontsize=9)
    return _save(fig, path)


def fewshot_figure(fs: dict, path: Path, colours: dict) -> str | None:
    """One panel per task: accuracy (mean ± std over seeds) per model as horizontal bars, the random-guess
    (chance) and majority-label baselines as vertical lines; the title gives the shots asked for and the
    demonstrations the prompts really held."""
    tasks = [t for t in fs if fs[t]]
    if not tasks:
        return None
    n_models = max(len(fs[t]) for t in tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 0.3 * n_models + 1.6), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        models = list(fs[t])
        y = np.arange(len(models))[::-1]
        acc = [((fs[t][m].get("accuracy") or {}).get("mean")) or 0.0 for m in models]
        std = [((fs[t][m].get("accuracy") or {}).get("std")) or 0.0 for m in models]
        ax.barh(y, acc, xerr=std, color=[colours.get(m, "tab:blue") for m in models], capsize=2)
        for yi, a, sd in zip(y, acc, std):
            ax.text(a + sd, yi, f" {a:.2f}", va="center", fontsize=7)
        ax.set_yticks(y, models, fontsize=8)
        base = next((r.get("baselines") for r in fs[t].values() if r.get("baselines")), None) or {}
        lines = []
        for name, style in (("random", "--"), ("majority", ":")):
            b = (base.get(name) or {}).get("accuracy")
            b = b.get("mean") if isinstance(b, dict) else b
            if b is not None:
                ax.axvline(b, color="black", ls=style, lw=1, label=f"{'chance' if name == 'random' else name} {b:.2f}")
                lines.append(b)
        ax.set_xlim(0, min(1.0, 1.25 * max([a + s for a, s in zip(acc, std)] + lines + [0.2])))
        ax.set_xlabel("accuracy (mean ± std over seeds)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_title(f"{t}: {shots_text(next(iter(fs[t].values())))}", fontsize=9)
    fig.suptitle("Few-shot in-context classification", fontsize=10)
    return _save(fig, path)


def shots_text(r: dict) -> str:
    """'8 shots'; '3 of 8 shots asked (the context's fit)' when fewer fit the context; '..., 2.5 used on average'
    when prompts were still cut."""
    shots, asked, used = r.get("shots"), r.get("shots_asked"), r.get("mean_demos")
    text = f"{shots} of {asked} shots asked (the context's fit)" if asked and shots is not None and asked > shots \
        else f"{shots} shots"
    if used is not None and shots is not None and used < shots - 1e-9:
        text += f", {used:.1f} used on average"
    return text


def moe_routing_figure(moe: dict, path: Path) -> str | None:
    """Per layer of the BTX MoE: each expert's share of the routed slots (bars; uniform load is the dashed
    line), with the per-token and mean-routing entropies against their maximum in the x labels."""
    routing = (moe or {}).get("routing") or {}
    layers = [r for r in routing.get("per_layer") or [] if r.get("load")]
    if not layers:
        return None
    n_e = max(len(r["load"]) for r in layers)
    colours = distinct_colours(n_e)
    width = 0.8 / n_e
    fig, ax = plt.subplots(figsize=(max(6.5, 0.25 * len(layers) * n_e + 3), 3.8))
    for e in range(n_e):
        ax.bar([i + (e - (n_e - 1) / 2) * width for i in range(len(layers))],
               [r["load"][e] if e < len(r["load"]) else 0 for r in layers], width, color=colours[e],
               label=f"expert {e}")
    ax.axhline(1 / n_e, color="black", ls="--", lw=0.8, label="uniform")
    mx = routing.get("max_entropy")
    ax.set_xticks(range(len(layers)), [f"layer {r['layer']}\nH {_fmt(r.get('per_token_entropy'))} / "
                                       f"{_fmt(r.get('mean_router_entropy'))}" for r in layers], fontsize=7)
    ax.set_ylabel("share of routed slots")
    ax.set_title("MoE routing: each expert's share of the routed slots, per layer\n"
                 f"H: per-token / mean-routing entropy in nats (uniform routing: {_fmt(mx)})", fontsize=9)
    ax.legend(fontsize=7, ncol=1 + n_e // 16, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_ylim(0, max(max(r["load"]) for r in layers) * 1.15)
    return _save(fig, path)


def _fmt(x) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) else "–"


def training_curves(trained: dict[str, dict], path: Path, colours: dict) -> str | None:
    """Training loss (lines, running mean) and validation loss (dots) of every trained model from its
    training.json, against the global optimizer step of the run: the seed's steps, then dense and each expert
    from the seed's last step (their `schedule_start`, else the seed's steps: they branch there), then the MoE from
    the experts' last step (it is built from them). Left: the whole run, experts thin; right: the branch phase
    only. Dense sees all domains, each expert its cluster's, so their losses are not on one scale."""
    curves = {m: t for m, t in trained.items() if t and t.get("loss_curve")}
    if not curves:
        return None
    seed_steps = (trained.get("seed") or {}).get("steps") or 0

    def branch_start(t):
        return ((t.get("config") or {}).get("schedule_start") or seed_steps) if t else seed_steps

    start = {m: branch_start(t) for m, t in curves.items() if m == "dense" or is_expert(m)}
    experts_end = max([start[m] + (curves[m].get("steps") or 0) for m in start if is_expert(m)],
                      default=seed_steps)
    start["seed"], start["moe"] = 0, experts_end
    panels = [("the run: seed → dense; seed → experts → MoE", list(curves), False)]
    if any(m != "seed" for m in curves):
        panels.append(("after the branch", [m for m in curves if m != "seed"], True))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.0), squeeze=False)
    for ax, (title, ms, zoom) in zip(axes[0], panels):
        for m in ms:
            t = curves[m]
            steps, loss = np.array(t["loss_curve"], dtype=float).T
            x0 = start.get(m, 0)
            thin = is_expert(m) and not zoom
            ax.plot(x0 + steps, _smooth(loss), color=colours.get(m), lw=0.7 if thin else 1.2, label=m,
                    alpha=0.7 if thin else 1.0)
            valid = np.array([v for v in t.get("valid_curve") or [] if v[1] is not None], dtype=float)
            if len(valid):
                ax.plot(x0 + valid[:, 0], valid[:, 1], "o", ms=2.5 if thin else 3.5, color=colours.get(m))
        for x, what in ((seed_steps, "branch"), (experts_end, "MoE built")):
            if x and (zoom or x > 0) and any(m in curves for m in (("moe",) if what == "MoE built" else ("dense",))):
                ax.axvline(x, color="black", lw=0.6, ls=":")
                ax.text(x, 1.0, f" {what}", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
        ax.set_xlabel("global optimizer step (seed; each branch from the seed's last step)")
        ax.set_ylabel("loss (nats/token" + (")" if zoom else ", log scale)"))
        if zoom:
            ax.set_xlim(left=max(0, seed_steps - 0.02 * max(experts_end, 1)))
        else:
            ax.set_yscale("log")
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_title(f"{title}: training loss (line), validation loss (dots)", fontsize=9)
        ax.legend(fontsize=7, ncol=2 if len(ms) > 8 else 1)
    return _save(fig, path)


def _smooth(y: np.ndarray) -> np.ndarray:
    """Running mean over ~4% of the curve (at least 1 point), so that step noise does not hide the trend."""
    w = max(1, len(y) // 25)
    if w == 1:
        return y
    c = np.cumsum(np.r_[0.0, y])
    return np.r_[c[1:w] / np.arange(1, w), (c[w:] - c[:-w]) / w]

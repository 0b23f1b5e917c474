"""`Study`: a grid of c-BTM runs in one run folder, summarised by `tasks.study.write_study`.

    luigi --module pipeline Study --local-scheduler --corpus ../shared/data/corpus_dev --label-field source \\
        --num-clusters 1,2,4,8 --train-tokens 50000000,200000000 --top-k 1,2,all --clusterer balanced,random

The flags named in `AXES` take comma lists (the grid); every other flag is a RunAll flag shared by every point.
Each point of the grid is the set of RunAll stages for its values, all under one `--run-dir`, so the hashed stage
folders are shared wherever a point's inputs are the same as another's (one corpus and embedding, one clustering
per (k, clusterer), one tokenizer, seed and dense model wherever their parameters agree, one evaluation per model).

- `num_clusters` 1 is the dense model: that point evaluates the seed and the dense model and trains no expert.
- `top_k` values (default 1,2,all) are variants of the c-BTM ensemble evaluated on the same experts, not separate
  trainings; the BTM posterior ensemble of every point uses `--posterior-top-k`.
- Points with k > 1 run the `Report` stage (their own `report-<h>/report.md`, without touching
  `<run_dir>/report.md`); the study is `study-<h>/{study.json, study.md, figures/}`, copied to
  `<run_dir>/study.{json,md}`.
- Any RunParams parameter can be an axis: add it to `AXES` (an axis that RunParams does not have yet is left out).
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import luigi

from corpus.io import InputError, atomic_file, read_json
from corpus.layout import STUDY_JSON, STUDY_MD, TRAINING_INFO
from clustering.router import TOP_K
from experts.run_models import DENSE, SEED, ensemble_name, has_training
from pipeline.params import SECTION, RunParams, cli_flag
from pipeline.stage import Stage
from pipeline.evaluation import EvaluatePerplexity
from pipeline.models import model_names, model_stage
from pipeline.report import Report, RunAll, run_param_names

# grid axis → its role: "train" points are trained; "experts" ones too, but the dense model (k = 1) ignores them;
# "eval" values are evaluation variants of the c-BTM ensemble on the same experts
AXES = {
    "num_clusters": "train",  # 1 = the dense model
    "train_tokens": "train",
    "clusterer": "experts",
    "compute_match": "experts",
    "seed_fraction": "train",
    "top_k": "eval",
}
GRID_AXES = tuple(a for a in AXES if isinstance(getattr(RunParams, a, None), luigi.Parameter))


class Study(Stage, RunParams):
    """Every point of the grid (see the module docstring) → `tasks.study.write_study` →
    `study-<h>/{study.json, study.md, figures/*.png}` + `<run_dir>/study.{json,md}`."""

    folder = "study"
    posterior_top_k = luigi.Parameter(
        default=luigi.configuration.get_config().get(SECTION, "top_k", str(TOP_K)),
        description="top-k of the BTM posterior ensemble of every point (an integer or 'all'; clipped to k)")

    # ---- the grid ------------------------------------------------------------------------------------
    def grid(self) -> dict[str, list]:
        """{axis: [values]} parsed from the comma lists (duplicates dropped, order kept)."""
        out = {}
        for name in GRID_AXES:
            text = str(getattr(self, name))
            raw = [v.strip() for v in text.split(",") if v.strip()]
            if not raw:
                raise InputError(f"{cli_flag(name)} is empty: give one value or a comma-separated list")
            param = getattr(RunParams, name)
            try:
                values = [param.parse(v) for v in raw]
            except ValueError:
                kind = type(param).__name__.replace("Parameter", "").lower() or "string"
                raise InputError(f"{cli_flag(name)} {text!r}: a comma-separated list of {kind} values") from None
            if name == "top_k":
                values = [str(v).lower() for v in values]
            out[name] = list(dict.fromkeys(values))
        return out

    def shared(self) -> dict:
        """The RunAll parameters every point shares (all but the axes)."""
        return {name: getattr(self, name) for name in run_param_names() if name not in GRID_AXES}

    def points(self) -> list[dict]:
        """One dict of training-axis values per point, in grid order; k = 1 points keep only the first value of
        the axes the dense model ignores, so the dense model appears once per budget."""
        grid = self.grid()
        train_axes = [a for a in GRID_AXES if AXES[a] != "eval"]
        out = []
        for combo in itertools.product(*(grid[a] for a in train_axes)):
            axes = dict(zip(train_axes, combo))
            if axes.get("num_clusters") == 1:
                axes.update({a: grid[a][0] for a in train_axes if AXES[a] == "experts"})
            if axes not in out:
                out.append(axes)
        return out

    def point_params(self, axes: dict) -> dict:
        """The RunParams of one point: the shared flags, the point's axis values and its --top-k (which sets the
        posterior ensemble's top-k)."""
        params = {**self.shared(), **axes}
        k = params["num_clusters"]
        top = str(self.posterior_top_k).lower()
        params["top_k"] = "all" if top == "all" or not top.isdigit() or int(top) >= k else top
        if k == 1:
            params["branch_from"] = "seed"
        return params

    def variants(self, k: int) -> dict[str, str]:
        """{top-k grid value: ensemble model name} of the c-BTM variants that apply with k experts."""
        if k < 2 or "ensemble" not in [m.strip() for m in self.merge_methods.split(",")]:
            return {}
        tops = self.grid().get("top_k", [])
        return {t: ensemble_name("all" if t == "all" or int(t) == k else t)
                for t in tops if t == "all" or int(t) <= k}

    def validate(self) -> None:
        """Every value of every axis, and every combination, is checked as RunAll checks its flags, before any
        work: one line naming the flag."""
        grid = self.grid()
        ks = grid.get("num_clusters", [self.num_clusters])
        for t in grid.get("top_k", []):
            if t != "all" and (not t.isdigit() or int(t) < 1):
                raise InputError(f"--top-k {t!r}: each value an integer ≥ 1 or 'all'")
            if t != "all" and max(ks) > 1 and int(t) > max(ks):
                raise InputError(f"--top-k {t} is larger than every --num-clusters value ({max(ks)})")
        top = str(self.posterior_top_k).lower()
        if top != "all" and (not top.isdigit() or int(top) < 1):
            raise InputError(f"--posterior-top-k {self.posterior_top_k!r}: an integer ≥ 1 or 'all'")
        train_axes = [a for a in GRID_AXES if AXES[a] != "eval"]
        for combo in itertools.product(*(grid[a] for a in train_axes)):
            RunAll(**self.point_params(dict(zip(train_axes, combo))))  # RunAll.__init__ validates

    # ---- stages ----------------------------------------------------------------------------------------
    @staticmethod
    def point_name(axes: dict) -> str:
        return " ".join(f"{a}={v}" for a, v in axes.items())

    def point_models(self, axes: dict) -> list[str]:
        """The models a point evaluates: seed and dense for k = 1; else every model of its RunAll plus the
        c-BTM variants of the top-k grid."""
        params = self.point_params(axes)
        if params["num_clusters"] == 1:
            return [SEED, DENSE]
        names = model_names(RunAll(**params))
        return names + [m for m in self.variants(params["num_clusters"]).values() if m not in names]

    def requires(self):
        out = {}
        for axes in self.points():
            params = self.point_params(axes)
            req = {"perplexity": {m: EvaluatePerplexity(**params, model=m) for m in self.point_models(axes)},
                   "trained": {}}
            run = RunAll(**params)
            for m in req["perplexity"]:
                if has_training(m):
                    req["trained"][m] = model_stage(run, m)[0]
            if params["num_clusters"] > 1:
                req["report"] = Report(**params)
            out[self.point_name(axes)] = req
        return out

    def build(self, out: Path) -> dict:
        from tasks.study import write_study

        points = []
        for axes, (name, req) in zip(self.points(), self.requires().items()):
            training = {}
            for m, t in req["trained"].items():
                f = self.input_path(t) / TRAINING_INFO
                training[m] = read_json(f) if f.is_file() else {}
            points.append({
                "name": name,
                "axes": axes,
                "variants": self.variants(axes["num_clusters"]),
                "perplexity": {m: read_json(self.input_path(t)) for m, t in req["perplexity"].items()},
                "training": training,
                "report_dir": str(self.input_path(req["report"])) if "report" in req else None,
            })
        settings = {**self.shared(), "posterior_top_k": self.posterior_top_k}
        study = write_study(out, points, self.grid(), settings=settings, run_dir=str(self.run_dir))
        # the run folder's copy: links point into this stage's folder
        md = (out / STUDY_MD).read_text(encoding="utf-8")
        md = re.sub(r"\]\(figures/", f"]({self.out_path().name}/figures/", md).replace("](../", "](")
        with atomic_file(Path(self.run_dir) / STUDY_MD) as f:
            f.write(md)
        with atomic_file(Path(self.run_dir) / STUDY_JSON) as f:
            f.write((out / STUDY_JSON).read_text(encoding="utf-8"))
        return {"points": len(points), "figures": study.get("figures", [])}


_DEFAULTS = {"top_k": "1,2,all"}  # the c-BTM variants every run evaluates anyway (pipeline.models.ensemble_variants)
for _axis in GRID_AXES:  # each axis flag of the Study takes a comma list; its default is RunAll's
    _param = getattr(RunParams, _axis)
    _grid = luigi.Parameter(default=_DEFAULTS.get(_axis, _param.serialize(_param._default)),
                            description=f"grid axis: comma-separated values of RunAll's {cli_flag(_axis)}")
    _grid.__set_name__(Study, _axis)  # what a class-body assignment does
    setattr(Study, _axis, _grid)

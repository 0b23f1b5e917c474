"""Every way to combine trained experts, one entry each (the registry of mergekit's `merge_methods/registry.py`):

    ensemble         c-BTM sparse ensemble: `ensemble.json` routed by centroid distances (`experts.ensemble`)
    posterior        BTM ensemble weighted by the posterior over experts, updating prior
    average          BTM parameter average (`experts.merge`)
    task_arithmetic, ties, dare_linear, dare_ties   merges of task vectors against the seed (`experts.merge`)
    moe              BTX mixture of experts (`experts.moe`)

An entry (`MergeMethod`) holds the method's build function, the folders it reads (`needs`: `clusters`
(centroids.npy), `embeddings` (embedder/), `assignments` (train.parquet with cluster_id), `seed` (the seed model),
`shards` (per-cluster blocks), `corpus` (train.parquet with text), and for `moe` with a task-vector `shared`,
`shared` (that merge's folder)), its parameters (`MergeInputs` fields) with the run flag each comes from, and for a
parameter merge how it merges one tensor (`TensorMerge`). `merge(method, out, inputs)` writes the merged model into
`out` (ensembles as Hugging Face model folders too, through `experts.hf_ensemble.write_hf_ensemble`) and returns a
summary for the caller's records.

Reading the registry imports no torch: the pipeline reads it while it builds its graph. Builds that need torch live
with their models (`experts.merge`, `experts.moe`) and are named by import path (`imported`), as transformers' auto
classes name model classes; those modules import this one, never the reverse.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from clustering.router import ROUTE_EVERY, ROUTE_WEIGHTS, TEMPERATURE, TOP_K
from corpus.io import InputError
from corpus.layout import CENTROIDS, TRAIN_SPLIT
from corpus.read import read_columns, take_rows

MERGE_WEIGHTS = ("uniform", "sizes")  # the parameter merges' expert weights
ROUTER_INITS = ("random", "centroids", "hidden")  # the MoE router's initialisation (`experts.moe.build_moe`)
ROUTER_TEXTS_PER_CLUSTER = 32  # training documents per cluster that initialise the MoE router from hidden states


@dataclass(frozen=True)
class MergeRecipe:
    """The values a parameter merge may read: λ (`lam`), TIES's `density`, DARE's `drop_rate` and RNG `seed`."""

    lam: float = 1.0
    density: float = 0.2
    drop_rate: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if not np.isfinite(self.lam):
            raise InputError(f"merge lambda must be a finite number, got {self.lam}")
        if not 0 < self.density <= 1:
            raise InputError(f"TIES density must be in (0, 1], got {self.density}")
        if not 0 <= self.drop_rate < 1:
            raise InputError(f"DARE drop rate must be in [0, 1), got {self.drop_rate}")


@dataclass(frozen=True)
class MergeInputs:
    """What a merge reads: the experts' folders (one per cluster, in cluster order), the other folders its method
    `needs`, and the settings of the methods.

    top_k, name: experts per prefix of an ensemble (None = all) and the model name written into ensemble.json.
    temperature, route_every, route_early, route_weights: the c-BTM ensemble's routing (`experts.ensemble`).
    weights: the parameter merges' expert weights, uniform or sizes (each cluster's share of the training docs).
    lam: λ of the task-vector merges; None chooses it on the validation shards (`experts.merge.LAMBDAS`).
    density, drop_rate, seed: TIES's kept fraction, DARE's drop probability, the RNG seed (also the MoE's).
    moe_top_k, router_init, moe_shared: the BTX MoE's experts per token, router initialisation, and where its
    attention, norms and embeddings come from (`MOE_SHARED`).
    device: where merges that run the model (λ search, hidden-state router init) run ('auto' | 'cpu' | 'cuda').
    """

    expert_dirs: list[str]
    folders: dict[str, Path] = field(default_factory=dict)
    top_k: int | None = TOP_K
    name: str = ""
    temperature: float = TEMPERATURE
    route_every: int = ROUTE_EVERY
    route_early: tuple[int, ...] = ()
    route_weights: str = ROUTE_WEIGHTS[0]
    weights: str = "sizes"
    lam: float | None = None
    density: float = MergeRecipe.density
    drop_rate: float = MergeRecipe.drop_rate
    seed: int = MergeRecipe.seed
    moe_top_k: int = 2
    router_init: str = "hidden"
    moe_shared: str = "average"
    device: str = "auto"


@dataclass(frozen=True)
class TensorMerge:
    """How a parameter merge merges one tensor (mergekit's generalized task arithmetic): `sparsify` each expert's
    tensor — None, "trim" (TIES: keep the `density` fraction of largest magnitudes) or "dare" (DARE: drop entries
    with probability `drop_rate`, rescale the rest) — then take the weighted sum, or with `elect_sign` TIES's sign
    election and disjoint mean (`experts.merge.merge_tensor`)."""

    sparsify: str | None = None
    elect_sign: bool = False


@dataclass(frozen=True)
class MergeMethod:
    """One merge method.

    build(method, out, inputs) -> dict writes the merged model into `out` and returns its summary.
    needs: the `MergeInputs.folders` it reads. params: {MergeInputs field: the run flag it comes from} for every
    setting its output depends on beyond the experts and those folders (what the pipeline hashes). paper: where
    the method comes from. tensors: how a parameter merge merges one tensor; None for the ensembles and the MoE.
    """

    name: str
    build: Callable[["MergeMethod", Path, MergeInputs], dict]
    needs: tuple[str, ...]
    params: dict[str, str] = field(default_factory=dict, hash=False)
    paper: str = ""
    tensors: TensorMerge | None = None

    @property
    def flags(self) -> tuple[str, ...]:
        """The run flags behind `params`."""
        return tuple(self.params.values())

    @property
    def uses_seed(self) -> bool:
        """Whether it reads the seed: a parameter merge that does merges task vectors θ_j − θ_seed."""
        return "seed" in self.needs


def imported(path: str) -> Callable:
    """The function at `path` ("module:function"), imported when it is first called."""
    module, _, name = path.partition(":")

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = path
    return call


def build_ensemble(method: MergeMethod, out: Path, inputs: MergeInputs) -> dict:
    from experts.ensemble_folder import save_ensemble_config  # torch, transformers: loaded when a merge runs
    from experts.hf_ensemble import write_hf_ensemble

    save_ensemble_config(out, inputs.expert_dirs, kind="sparse", centroids_path=inputs.folders["clusters"] / CENTROIDS,
                         embedder_dir=inputs.folders["embeddings"] / "embedder", top_k=inputs.top_k,
                         temperature=inputs.temperature, route_every=inputs.route_every,
                         route_early=list(inputs.route_early), route_weights=inputs.route_weights,
                         name=inputs.name or method.name)
    write_hf_ensemble(out)  # loadable with AutoModelForCausalLM
    return {}


def build_posterior(method: MergeMethod, out: Path, inputs: MergeInputs) -> dict:
    from experts.ensemble_folder import save_ensemble_config  # torch, transformers: loaded when a merge runs
    from experts.hf_ensemble import write_hf_ensemble

    save_ensemble_config(out, inputs.expert_dirs, kind="posterior", prior="updating", top_k=inputs.top_k,
                         name=inputs.name or method.name)
    write_hf_ensemble(out)  # loadable with AutoModelForCausalLM
    return {}


RECIPE_FLAGS = {"weights": "merge_weights", "lam": "merge_lambda", "density": "ties_density",
                "drop_rate": "dare_drop_rate", "seed": "seed"}
"""The run flag behind each parameter-merge input: the expert weights and the `MergeRecipe` fields."""


def _recipe(*fields: str) -> dict[str, str]:
    return {f: RECIPE_FLAGS[f] for f in ("weights",) + fields}


_PARAMETER_MERGE = imported("experts.merge:build_parameter_merge")
_AGAINST_SEED = ("assignments", "seed", "shards")  # document shares, θ_seed, validation blocks for λ
MERGE_METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("ensemble", build_ensemble, ("clusters", "embeddings"),
                {"top_k": "ensemble_top_k", "temperature": "temperature", "route_every": "route_every",
                 "route_early": "route_early", "route_weights": "route_weights"},
                "Gururangan et al. 2023, arXiv:2303.14177"),
    MergeMethod("posterior", build_posterior, (), {"top_k": "top_k"}, "Li et al. 2022, Branch-Train-Merge"),
    MergeMethod("average", _PARAMETER_MERGE, ("assignments",), _recipe(), "Li et al. 2022, Branch-Train-Merge",
                TensorMerge()),
    MergeMethod("task_arithmetic", _PARAMETER_MERGE, _AGAINST_SEED, _recipe("lam"),
                "Ilharco et al. 2023, arXiv:2212.04089", TensorMerge()),
    MergeMethod("ties", _PARAMETER_MERGE, _AGAINST_SEED, _recipe("lam", "density"),
                "Yadav et al. 2023, arXiv:2306.01708", TensorMerge("trim", elect_sign=True)),
    MergeMethod("dare_linear", _PARAMETER_MERGE, _AGAINST_SEED, _recipe("lam", "drop_rate", "seed"),
                "Yu et al. 2024, arXiv:2311.03099", TensorMerge("dare")),
    MergeMethod("dare_ties", _PARAMETER_MERGE, _AGAINST_SEED, _recipe("lam", "drop_rate", "seed"),
                "Yu et al. 2024 + Yadav et al. 2023", TensorMerge("dare", elect_sign=True)),
    MergeMethod("moe", imported("experts.moe:build_moe_merge"),
                ("clusters", "embeddings", "seed", "corpus", "assignments"),
                {"moe_top_k": "moe_top_k", "router_init": "router_init", "seed": "seed", "moe_shared": "moe_shared"},
                "Sukhbaatar et al. 2024, arXiv:2403.07816"),
)}
PARAMETER_MERGES = {name: m for name, m in MERGE_METHODS.items() if m.tensors is not None}
TASK_VECTOR_MERGES = tuple(name for name, m in PARAMETER_MERGES.items() if m.uses_seed)  # merges against the seed
MOE_SHARED = ("average", "seed") + TASK_VECTOR_MERGES  # where the MoE's non-FFN weights come from


def get_method(name: str) -> MergeMethod:
    if name not in MERGE_METHODS:
        raise InputError(f"unknown merge method {name!r}; choose one of {', '.join(MERGE_METHODS)}")
    return MERGE_METHODS[name]


def needs(method: str, moe_shared: str = "average") -> tuple[str, ...]:
    """The folders `method` reads: its `needs`, plus `shared` for a MoE whose shared weights come from a
    task-vector merge."""
    extra = ("shared",) if method == "moe" and moe_shared in TASK_VECTOR_MERGES else ()
    return get_method(method).needs + extra


def merge(method: str, out: Path, inputs: MergeInputs) -> dict:
    """Combine `inputs.expert_dirs` with `method` into `out`; returns the method's summary."""
    m = get_method(method)
    return m.build(m, Path(out), inputs)


def document_shares(assignments_dir: Path, k: int) -> list[float]:
    """Each cluster's share of the training documents, from `<assignments_dir>/train.parquet` (cluster_id); the
    token shares of the budgets are `experts.budget.cluster_shares`."""
    ids = read_columns(Path(assignments_dir) / TRAIN_SPLIT, ["cluster_id"]).column(0).to_numpy()
    counts = np.bincount(ids, minlength=k)
    return (counts / max(1, int(counts.sum()))).tolist()


def cluster_texts(corpus_dir: Path, assignments_dir: Path, k: int,
                  per_cluster: int = ROUTER_TEXTS_PER_CLUSTER) -> list[list[str]]:
    """Up to `per_cluster` training documents of each of the `k` clusters, in document order."""
    ids = read_columns(Path(assignments_dir) / TRAIN_SPLIT, ["cluster_id"]).column(0).to_pylist()
    rows: list[list[int]] = [[] for _ in range(k)]
    for i, c in enumerate(ids):
        if len(rows[c]) < per_cluster:
            rows[c].append(i)
    flat = [i for group in rows for i in group]
    texts = iter(row["text"] for row in take_rows(Path(corpus_dir) / TRAIN_SPLIT, flat, ["text"]))
    return [[next(texts) for _ in group] for group in rows]

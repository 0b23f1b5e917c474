"""Every way to combine trained experts, by name (the registry pattern of mergekit's `merge_methods/registry.py`: a
method is one entry, not a branch of an if/elif).

    ensemble         c-BTM sparse ensemble: `ensemble.json` routed by centroid distances (`experts.ensemble`)
    posterior        BTM ensemble weighted by the posterior over experts, updating prior
    average          BTM parameter average (`experts.merge`)
    task_arithmetic, ties, dare_linear, dare_ties   merges of task vectors against the seed (`experts.merge`)
    moe              BTX mixture of experts (`experts.moe.build_moe`)

`merge(method, out, inputs)` writes the merged model into `out` (ensembles as Hugging Face model folders too, through
`experts.hf_ensemble.write_hf_ensemble`) and returns a summary for the caller's records. `needs(method)` names
the folders a method reads (`MergeInputs.folders`): `clusters` (centroids.npy), `embeddings` (embedder/),
`assignments` (train.parquet with cluster_id), `seed` (the seed model), `shards` (per-cluster blocks), `corpus`
(train.parquet with text), and for `moe` with a task-vector `shared`, `shared` (that merge's folder).

The methods import torch and transformers when they run, not when this module is imported: the pipeline reads
`MERGE_METHODS` and `needs` while it builds its graph, which stays light.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from corpus.io import InputError, load_array, read_json
from corpus.layout import CENTROIDS, MERGE_INFO, MOE_INFO, TRAIN_SPLIT
from corpus.read import read_columns, take_rows

TASK_VECTOR_MERGES = ("task_arithmetic", "ties", "dare_linear", "dare_ties")  # merges against the seed
PARAMETER_MERGES = ("average",) + TASK_VECTOR_MERGES  # the keys of experts.merge.METHODS
MOE_SHARED = ("average", "seed") + TASK_VECTOR_MERGES  # where the MoE's non-FFN weights come from
MERGE_WEIGHTS = ("uniform", "sizes")
ROUTER_INITS = ("random", "centroids", "hidden")
ROUTER_TEXTS_PER_CLUSTER = 32  # training documents per cluster that initialise the MoE router from hidden states


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
    top_k: int | None = 2
    name: str = ""
    temperature: float = 0.1
    route_every: int = 16
    route_early: tuple[int, ...] = ()
    route_weights: str = "posterior"
    weights: str = "sizes"
    lam: float | None = None
    density: float = 0.2
    drop_rate: float = 0.5
    seed: int = 0
    moe_top_k: int = 2
    router_init: str = "hidden"
    moe_shared: str = "average"
    device: str = "auto"


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: `build(out, inputs)` writes the merged model into `out` and returns its summary; `needs`
    are the `MergeInputs.folders` it reads."""

    build: Callable[[Path, MergeInputs], dict]
    needs: tuple[str, ...]


def _ensemble(out: Path, inputs: MergeInputs) -> dict:
    from experts.ensemble_folder import save_ensemble_config  # torch, transformers: loaded when a merge runs
    from experts.hf_ensemble import write_hf_ensemble

    save_ensemble_config(out, inputs.expert_dirs, kind="sparse", centroids_path=inputs.folders["clusters"] / CENTROIDS,
                         embedder_dir=inputs.folders["embeddings"] / "embedder", top_k=inputs.top_k,
                         temperature=inputs.temperature, route_every=inputs.route_every,
                         route_early=list(inputs.route_early), route_weights=inputs.route_weights,
                         name=inputs.name or "ensemble")
    write_hf_ensemble(out)  # loadable with AutoModelForCausalLM
    return {}


def _posterior(out: Path, inputs: MergeInputs) -> dict:
    from experts.ensemble_folder import save_ensemble_config  # torch, transformers: loaded when a merge runs
    from experts.hf_ensemble import write_hf_ensemble

    save_ensemble_config(out, inputs.expert_dirs, kind="posterior", prior="updating", top_k=inputs.top_k,
                         name=inputs.name or "posterior")
    write_hf_ensemble(out)  # loadable with AutoModelForCausalLM
    return {}


def _parameter_merge(method: str) -> Callable[[Path, MergeInputs], dict]:
    def build(out: Path, inputs: MergeInputs) -> dict:
        """`experts.merge.merge_experts`; with `lam` None, λ is the value of least loss on the validation shards."""
        from corpus.device import resolve_device  # torch: loaded when a merge runs
        from experts.data import shard_paths
        from experts.merge import LAMBDAS, METHODS, MergeRecipe, merge_experts, sample_blocks

        uses_seed = METHODS[method].uses_seed
        auto = uses_seed and inputs.lam is None
        recipe = MergeRecipe(lam=1.0 if inputs.lam is None else inputs.lam, density=inputs.density,
                             drop_rate=inputs.drop_rate, seed=inputs.seed)
        blocks = sample_blocks(shard_paths(inputs.folders["shards"], split="valid")) if auto else None
        weights = document_shares(inputs.folders["assignments"], len(inputs.expert_dirs)) \
            if inputs.weights == "sizes" else None
        merge_experts(inputs.expert_dirs, out, method, seed_dir=inputs.folders["seed"] if uses_seed else None,
                      weights=weights, recipe=recipe, lambdas=LAMBDAS if auto else None, valid_blocks=blocks,
                      device=str(resolve_device(inputs.device).device))
        meta = read_json(out / MERGE_INFO)
        return {"recipe": meta["recipe"], "weights": meta["weights"]}
    return build


def _moe(out: Path, inputs: MergeInputs) -> dict:
    from clustering.embed import load_embedder
    from experts.moe import build_moe  # torch, transformers: loaded when a merge runs

    k = len(inputs.expert_dirs)
    shared = {"average": None, "seed": inputs.folders["seed"]}.get(inputs.moe_shared, inputs.folders.get("shared"))
    texts = cluster_texts(inputs.folders["corpus"], inputs.folders["assignments"], k) \
        if inputs.router_init != "random" else None
    embedder = load_embedder(inputs.folders["embeddings"] / "embedder", device="cpu") \
        if inputs.router_init == "centroids" else None  # maps the documents that fit hidden states → centroids
    build_moe(inputs.expert_dirs, out, seed_dir=inputs.folders["seed"], router_init=inputs.router_init,
              top_k=min(inputs.moe_top_k, k), centroids=load_array(inputs.folders["clusters"] / CENTROIDS),  # (k, dim)
              embedder=embedder, cluster_texts=texts, seed=inputs.seed, shared_dir=shared)
    meta = read_json(out / MOE_INFO)
    return {"shared": inputs.moe_shared, "router_init": meta["router_init"], "router": meta["router"]["method"]}


MERGE_METHODS: dict[str, MergeMethod] = {
    "ensemble": MergeMethod(_ensemble, ("clusters", "embeddings")),
    "posterior": MergeMethod(_posterior, ()),
    "average": MergeMethod(_parameter_merge("average"), ("assignments",)),
    **{m: MergeMethod(_parameter_merge(m), ("assignments", "seed", "shards")) for m in TASK_VECTOR_MERGES},
    "moe": MergeMethod(_moe, ("clusters", "embeddings", "seed", "corpus", "assignments")),
}


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
    return get_method(method).build(Path(out), inputs)


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

"""Parameter merges of experts that branched from one seed: one static model for all inputs.

With task vectors τ_j = θ_j − θ_seed and weights w_j ≥ 0, Σ_j w_j = 1 (`normalise_weights`):

- average (Li et al. 2022, "Branch-Train-Merge", §5): θ = Σ_j w_j θ_j. No seed; equal to task_arithmetic with
  λ = 1 whenever the experts branched from the seed.
- task_arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic"): θ = θ_seed + λ Σ_j w_j τ_j.
  The paper scales the plain sum Σ_j τ_j; with weights summing to 1, its λ is k times ours.
- ties (Yadav et al. 2023, "TIES-Merging"): per tensor, trim each τ_j to its `density` fraction of largest
  magnitudes (τ̂_j), elect the sign γ = sgn(Σ_j w_j τ̂_j), and take the disjoint mean over the experts that agree
  with it, τ = Σ_j w_j τ̂_j [sgn τ̂_j = γ] / Σ_j w_j [sgn τ̂_j = γ] (0 where none agrees); θ = θ_seed + λ τ.
- dare_linear (Yu et al. 2024, "Language Models are Super Mario"): drop each entry of τ_j with probability
  p and rescale the rest, τ̃_j = m_j ⊙ τ_j / (1 − p), m_j ~ Bernoulli(1 − p) (seeded per tensor and expert),
  then task arithmetic. With p = 0 it is task_arithmetic.
- dare_ties: DARE's drop and rescale instead of TIES's trim, then TIES's sign election and disjoint mean.

The recipes follow mergekit's `generalized_task_arithmetic.py` and `sparsify.py` (arcee-ai/mergekit): trimming is
per tensor (the TIES paper trims the whole flattened task vector), the elected sign of a zero sum is +, and an
entry where no expert agrees keeps the seed's value. mergekit itself is not a dependency: it pins tqdm, click,
pydantic, accelerate and safetensors versions of its own and builds a task graph over whole models, where this
module streams one tensor at a time through `experts.merge_io.CheckpointReader`. Each method is one entry of
`experts.merging.MERGE_METHODS`: its `TensorMerge` says how `merge_tensor` merges one tensor.

`merge_experts` reads one tensor of the seed and of each expert at a time (memory-mapped safetensors) and merges it
in fp32, holding θ_seed and τ (two fp32 models) so that λ can be chosen on validation blocks without re-reading the
experts; it writes a `save_pretrained` folder with the seed's tokenizer and `merge.json` (the recipe).
`average_experts` and `branch_average` (the weighted average a new expert branches from, BTM) are its `average`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clustering.router import CentroidRouter
from corpus.device import resolve_device
from corpus.io import InputError, read_json
from corpus.layout import MERGE_INFO
from experts.data import shard_paths
from experts.merge_io import CheckpointReader, check_expert_dirs, fill_meta_model, save_merged_model
from experts.merging import (PARAMETER_MERGES, MergeInputs, MergeMethod, MergeRecipe, TensorMerge,
                             document_shares)

log = logging.getLogger(__name__)


# ---- the per-tensor operations --------------------------------------------------------------------------------
def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: keep the round(density · numel) entries of largest magnitude (at least one), zero the rest."""
    if density >= 1:
        return delta
    keep = max(1, int(round(density * delta.numel())))
    flat = delta.reshape(-1)
    idx = torch.topk(flat.abs(), keep, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view_as(delta)


def drop_and_rescale(delta: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: zero each entry with probability `drop_rate`, multiply the survivors by 1 / (1 − drop_rate)."""
    if drop_rate == 0:
        return delta
    keep = torch.rand(delta.shape, generator=generator) >= drop_rate
    return delta * keep / (1.0 - drop_rate)


def elect_and_mean(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES's sign election and disjoint mean of `deltas` (k, *shape) with weights (k,) → (*shape)."""
    w = weights.reshape(-1, *([1] * (deltas.dim() - 1)))  # (k, 1, ...)
    weighted = deltas * w
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)  # (*shape)
    agree = (torch.sign(deltas) == sign).to(deltas.dtype)  # (k, *shape); zeros never agree
    divisor = (w * agree).sum(0)
    return (weighted * agree).sum(0) / torch.where(divisor > 0, divisor, torch.ones_like(divisor))


def _generator(recipe: MergeRecipe, key: str, j: int) -> torch.Generator:
    """One RNG per (recipe seed, tensor name, expert): the masks do not depend on the order tensors are read."""
    return torch.Generator().manual_seed((recipe.seed * 1_000_003 + zlib.crc32(key.encode()) * 131 + j) % 2**63)


def merge_tensor(tensors: list[torch.Tensor], w: torch.Tensor, recipe: MergeRecipe, key: str,
                 how: TensorMerge) -> torch.Tensor:
    """One tensor of a parameter merge: the experts' task vectors τ_j (for `average`, their θ_j), weights w (k,),
    the recipe and the tensor's name → the merged τ (θ), all fp32. `how.sparsify` trims (TIES) or drops and
    rescales (DARE, one seeded mask per tensor and expert) each τ_j; then the weighted sum Σ_j w_j τ_j, or with
    `how.elect_sign` TIES's sign election and disjoint mean."""
    if how.sparsify == "trim":
        tensors = [trim(t, recipe.density) for t in tensors]
    elif how.sparsify == "dare":
        tensors = [drop_and_rescale(t, recipe.drop_rate, _generator(recipe, key, j)) for j, t in enumerate(tensors)]
    elif how.sparsify is not None:
        raise ValueError(f"unknown sparsification {how.sparsify!r}")
    if how.elect_sign:
        return elect_and_mean(torch.stack(tensors), w)
    return sum(wj * t for wj, t in zip(w.tolist(), tensors))


def parameter_merge(name: str) -> MergeMethod:
    """The registry entry of the parameter merge `name`; InputError naming the others otherwise."""
    if name not in PARAMETER_MERGES:
        raise InputError(f"unknown parameter merge {name!r}; choose one of {', '.join(PARAMETER_MERGES)}")
    return PARAMETER_MERGES[name]


def recipe_dict(method: str, recipe: MergeRecipe) -> dict:
    """The recipe values `method` depends on, e.g. {"lam": 1.0, "density": 0.2} for ties."""
    fields = {f.name for f in dataclasses.fields(MergeRecipe)}
    return {p: getattr(recipe, p) for p in parameter_merge(method).params if p in fields}


def normalise_weights(weights: Sequence[float] | None, k: int) -> np.ndarray:
    """(k,) float64 weights ≥ 0 summing to 1 (uniform when None); InputError otherwise."""
    if weights is None:
        return np.full(k, 1.0 / k)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != k:
        raise InputError(f"{w.shape[0]} weights given for {k} experts")
    if not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise InputError(f"averaging weights must be finite, ≥ 0 and not all zero, got {w.tolist()}")
    return w / w.sum()


# ---- merging checkpoints --------------------------------------------------------------------------------------
def _check_same_tensors(base: CheckpointReader, others: list[CheckpointReader], base_name: str) -> None:
    """InputError naming the first tensor that one of `others` lacks, adds or shapes differently from `base`."""
    why = "task-arithmetic merges need experts of the seed's architecture" if base_name == "the seed" else \
        "merged experts need one architecture"
    for r in others:
        missing = [k for k in base.keys() if k not in r.where]
        extra = [k for k in r.keys() if k not in base.where]
        if missing:
            raise InputError(f"expert {r.dir} lacks tensor {missing[0]} of {base_name} {base.dir}; {why}")
        if extra:
            raise InputError(f"expert {r.dir} has tensor {extra[0]} that {base_name} {base.dir} lacks; {why}")
    for k in base.keys():
        shape = base.shape(k)
        for r in others:
            if r.shape(k) != shape:
                raise InputError(f"tensor {k} has shape {shape} in {base_name} {base.dir} but {r.shape(k)} in "
                                 f"expert {r.dir}; {why}")


def task_vector_state(expert_dirs: Sequence[str | os.PathLike], method: str,
                      seed_dir: str | os.PathLike | None = None, weights: Sequence[float] | None = None,
                      recipe: MergeRecipe | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(θ_seed, τ) as {tensor name: fp32 tensor}: the seed and the merged task vector, so that the merge is
    θ_seed + λ τ; for `average` ({}, θ_avg). Tensors are read one at a time; non-float tensors (none in Llama)
    are the seed's, with τ = 0. Checks architecture and tokenizer (InputError naming the tensor / field)."""
    m = parameter_merge(method)
    recipe = recipe or MergeRecipe()
    expert_dirs = [Path(d) for d in expert_dirs]
    if not expert_dirs:
        raise InputError("no expert directories given")
    if m.uses_seed and seed_dir is None:
        raise InputError(f"merge method {method} needs the seed the experts branched from (seed_dir)")
    w = torch.as_tensor(normalise_weights(weights, len(expert_dirs)), dtype=torch.float32)  # (k,)
    for d in expert_dirs + ([Path(seed_dir)] if m.uses_seed else []):
        if not d.is_dir():
            raise InputError(f"model directory does not exist: {d}")
    check_expert_dirs(expert_dirs)
    readers = [CheckpointReader(d) for d in expert_dirs]
    if m.uses_seed:
        base = CheckpointReader(seed_dir)
        _check_same_tensors(base, readers, "the seed")
        # config fields the shapes do not show, and the tokenizer: the experts agree with the first (checked
        # above), so the seed against the first is the seed against all
        check_expert_dirs([expert_dirs[0], Path(seed_dir)])
    else:
        base = readers[0]
        _check_same_tensors(base, readers[1:], "the first expert")
    seed_state: dict[str, torch.Tensor] = {}
    merged: dict[str, torch.Tensor] = {}
    keys = base.keys()
    for n, key in enumerate(keys):
        first = base.get(key)
        if not first.is_floating_point():
            seed_state[key], merged[key] = first, torch.zeros_like(first)
            continue
        if m.uses_seed:
            seed_state[key] = first.float()
            merged[key] = merge_tensor([r.get(key).float() - seed_state[key] for r in readers], w, recipe, key,
                                       m.tensors)
        else:
            merged[key] = merge_tensor([r.get(key).float() for r in readers], w, recipe, key, m.tensors)
        if n % 50 == 0:
            log.info("%s: merged %d/%d tensors", method, n + 1, len(keys))
    return seed_state, merged


def combine_state(seed_state: dict, merged: dict, lam: float) -> dict[str, torch.Tensor]:
    """θ_seed + λ τ per tensor (τ itself when there is no seed, i.e. `average`)."""
    if not seed_state:
        return dict(merged)
    return {k: (seed_state[k] + lam * merged[k]) if merged[k].is_floating_point() else seed_state[k] for k in merged}


def merged_state(expert_dirs: Sequence[str | os.PathLike], method: str, seed_dir: str | os.PathLike | None = None,
                 weights: Sequence[float] | None = None, recipe: MergeRecipe | None = None) -> dict[str, torch.Tensor]:
    """{tensor name: merged fp32 tensor} of `method` with the recipe's λ."""
    recipe = recipe or MergeRecipe()
    return combine_state(*task_vector_state(expert_dirs, method, seed_dir, weights, recipe), recipe.lam)


# ---- choosing λ on held-out blocks ----------------------------------------------------------------------------
LAMBDAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)
"""λ grid for `merge_experts(lambdas=...)`; task arithmetic and TIES pick λ on validation data the same way."""


def sample_blocks(shard_paths: Sequence[str | os.PathLike], max_blocks: int = 64) -> np.ndarray:
    """(n, T) token blocks: the first blocks of each `.npy` shard (`experts.data.shard_corpus`), their numbers in
    proportion to the shards' sizes (at least one each), about `max_blocks` in all."""
    arrays = [np.load(p, mmap_mode="r") for p in shard_paths]
    arrays = [a for a in arrays if len(a)]
    if not arrays:
        raise InputError(f"no token blocks in {', '.join(map(str, shard_paths)) or 'no shards'}")
    total = sum(len(a) for a in arrays)
    return np.concatenate([np.asarray(a[: max(1, round(max_blocks * len(a) / total))]) for a in arrays])


@torch.no_grad()
def mean_nll(model, blocks: np.ndarray, batch_size: int = 8) -> float:
    """Mean next-token NLL (nats) of `model` over the (n, T) token blocks."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in range(0, len(blocks), batch_size):
        x = torch.as_tensor(np.asarray(blocks[b : b + batch_size], dtype=np.int64), device=device)
        logits = model(input_ids=x).logits[:, :-1].float()  # (B, T-1, V)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return total / max(count, 1)


def _model_like(source: Path, state: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    fill_meta_model(model, state, f"checkpoint {source}")
    return model


def merge_experts(expert_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, method: str,
                  seed_dir: str | os.PathLike | None = None, weights: Sequence[float] | None = None,
                  recipe: MergeRecipe | None = None, lambdas: Sequence[float] | None = None,
                  valid_blocks: np.ndarray | None = None, device: str = "cpu") -> Path:
    """Merge the experts with `method` (a key of `experts.merging.PARAMETER_MERGES`) into `out_dir` (atomic):
    `save_pretrained` weights, the seed's tokenizer (the first expert's for `average`) and `merge.json` = {method,
    paper, experts, seed, weights, recipe, lambda_search}. Returns `out_dir`, loadable with `AutoModelForCausalLM.from_pretrained`.

    With `lambdas` and `valid_blocks` ((n, T) token ids), λ is the grid value of least mean NLL on those blocks
    (`lambda_search` records each value's NLL); else the recipe's λ. Experts must have the seed's tensors and
    shapes (InputError naming the tensor otherwise) and its tokenizer.
    """
    m = parameter_merge(method)
    recipe = recipe or MergeRecipe()
    seed_state, merged = task_vector_state(expert_dirs, method, seed_dir, weights, recipe)
    source = Path(seed_dir) if m.uses_seed else Path(expert_dirs[0])
    search = None
    if lambdas is not None and m.uses_seed:
        if valid_blocks is None or len(valid_blocks) == 0:
            raise InputError(f"choosing the merge lambda of {method} needs validation blocks")
        if not lambdas or not all(np.isfinite(v) for v in lambdas):
            raise InputError(f"merge lambda grid must be finite numbers, got {list(lambdas)}")
        from experts.model import load_causal_lm

        model = load_causal_lm(source, load_tokenizer=False)[0].float().to(device).eval()
        params = model.state_dict()
        search = {}
        for lam in lambdas:
            for k, t in merged.items():  # in place: θ_seed + λ τ, one tensor at a time
                if t.is_floating_point():
                    params[k].copy_((seed_state[k] + float(lam) * t).to(device))
            search[float(lam)] = mean_nll(model, valid_blocks)
            log.info("%s: λ=%g → validation NLL %.4f", method, lam, search[float(lam)])
        del model
        recipe = dataclasses.replace(recipe, lam=min(search, key=search.get))
    state = combine_state(seed_state, merged, recipe.lam)
    del seed_state, merged
    w = normalise_weights(weights, len(expert_dirs))
    return save_merged_model(_model_like(source, state), source, out_dir, MERGE_INFO, {
        "method": method, "paper": m.paper, "experts": [str(d) for d in expert_dirs],
        "seed": str(seed_dir) if m.uses_seed else None, "weights": w.tolist(), "recipe": recipe_dict(method, recipe),
        "lambda_search": {str(k): v for k, v in search.items()} if search else None,
        "valid_blocks": None if search is None else list(np.asarray(valid_blocks).shape)})


def build_parameter_merge(method: MergeMethod, out: Path, inputs: MergeInputs) -> dict:
    """The build of every parameter merge of `experts.merging.MERGE_METHODS`: `merge_experts` with the inputs'
    recipe and weights; with `lam` None, λ is the value of least loss on the validation shards."""
    uses_seed = method.uses_seed
    auto = uses_seed and inputs.lam is None
    recipe = MergeRecipe(lam=1.0 if inputs.lam is None else inputs.lam, density=inputs.density,
                         drop_rate=inputs.drop_rate, seed=inputs.seed)
    blocks = sample_blocks(shard_paths(inputs.folders["shards"], split="valid")) if auto else None
    weights = document_shares(inputs.folders["assignments"], len(inputs.expert_dirs)) \
        if inputs.weights == "sizes" else None
    merge_experts(inputs.expert_dirs, out, method.name, seed_dir=inputs.folders["seed"] if uses_seed else None,
                  weights=weights, recipe=recipe, lambdas=LAMBDAS if auto else None, valid_blocks=blocks,
                  device=str(resolve_device(inputs.device).device))
    meta = read_json(out / MERGE_INFO)
    return {"recipe": meta["recipe"], "weights": meta["weights"]}


# ---- averaging (BTM) ------------------------------------------------------------------------------------------
def average_experts(expert_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                    weights: Sequence[float] | None = None) -> Path:
    """Average the experts' parameters into `out_dir` (atomic): `merge_experts` with method `average` (model
    weights via `save_pretrained`, the first expert's tokenizer, `merge.json`). Returns `out_dir`.

    Loadable with `AutoModelForCausalLM.from_pretrained(out_dir)`. Experts must share architecture, shapes
    and tokenizer (InputError naming the mismatch and the directories otherwise).
    """
    return merge_experts(expert_dirs, out_dir, "average", weights=weights)


def branch_average(expert_dirs: Sequence[str | os.PathLike], expert_centroids: np.ndarray, centroid: np.ndarray,
                   temperature: float, out_dir: str | os.PathLike) -> Path:
    """The model a new expert branches from (BTM, Li et al. 2022 §4: a weighted average of existing experts):
    `average_experts` of expert_dirs with w_j = softmax_j(−‖c − c_j‖² / T), the routing weights
    (`CentroidRouter.weights`, over all of them) of the new cluster's centroid c (d,) among the experts' centroids
    c_j, expert_centroids (n_experts, d) in the order of expert_dirs. Writes out_dir (atomic) and returns it; it is
    then the `init` of the new expert's training."""
    router = CentroidRouter(None, expert_centroids, temperature)  # top_k: every expert
    weights = router.weights(np.asarray(centroid)[None, :])[0]  # (n_experts,)
    return average_experts(expert_dirs, out_dir, weights=weights.tolist())

"""The models of a run: their names, and `load_model(folder)`, the `ScoringModel` of any model folder of a run.

Names: `seed`, `dense`, `expert_003` (the expert of cluster 3), `ensemble_top1` / `ensemble_top2` /
`ensemble_topall` (the c-BTM sparse ensemble with top_k 1, 2, all experts), `posterior` (BTM), the parameter merges
(their method names: `experts.merging.PARAMETER_MERGES`), `moe` (BTX after finetuning) and `moe_merged` (before),
`dense_moe_compute` (dense continued for the MoE finetune's tokens: the MoE's equal-compute baseline), and `oracle`:
a perplexity reference, not a model (each document scored by the expert of its own cluster). Which of them a run
makes is the pipeline's (`pipeline.models.model_names`).

Importing this module is light (no torch): the pipeline reads names while it builds its graph.
"""
from __future__ import annotations

from pathlib import Path

from corpus.io import ConfigError
from corpus.layout import ENSEMBLE_CONFIG

SEED, DENSE, POSTERIOR, MOE, MOE_MERGED = "seed", "dense", "posterior", "moe", "moe_merged"
DENSE_MOE_COMPUTE = "dense_moe_compute"
ORACLE = "oracle"
TRAINED = (SEED, DENSE, MOE, DENSE_MOE_COMPUTE)  # models with a training.json of their own, besides every expert
_EXPERT, _ENSEMBLE = "expert_", "ensemble_top"


def expert_name(cluster_id: int) -> str:
    """`expert_003` for cluster 3."""
    return f"{_EXPERT}{cluster_id:03d}"


def is_expert(name: str) -> bool:
    return name.startswith(_EXPERT)


def expert_cluster(name: str) -> int | None:
    """The cluster_id of an expert's name (`expert_003` → 3); None for any other name."""
    rest = name[len(_EXPERT):]
    return int(rest) if is_expert(name) and rest.isdigit() else None


def ensemble_name(top_k) -> str:
    """`ensemble_top2` for the c-BTM ensemble of top_k 2 (`ensemble_topall`: top_k 'all')."""
    return f"{_ENSEMBLE}{top_k}"


def is_ensemble(name: str) -> bool:
    """Whether `name` is a c-BTM sparse ensemble's (`ensemble_top<k>`; the BTM ensemble is `posterior`)."""
    return name.startswith(_ENSEMBLE)


def ensemble_top_k(name: str) -> str | None:
    """The top_k of a c-BTM ensemble's name as written in it (`ensemble_top2` → '2', `ensemble_topall` → 'all');
    None for any other name."""
    return name[len(_ENSEMBLE):] if is_ensemble(name) else None


def has_training(name: str) -> bool:
    """Whether the model's folder holds its own training.json (the trained models: `TRAINED` and the experts)."""
    return name in TRAINED or is_expert(name)


# ---- loading ---------------------------------------------------------------------------------------------------
KINDS = ("auto", "hf", "ensemble")  # a model folder's kind: a save_pretrained folder or an ensemble folder


def model_kind(folder: str | Path, kind: str = "auto") -> str:
    """'ensemble' (the folder has ensemble.json) or 'hf' (a config.json), checked against `kind` unless it is
    'auto'; a `ConfigError` naming the field (`kind` or `folder`) otherwise."""
    folder = Path(folder)
    if kind not in KINDS:
        raise ConfigError("kind", f"{kind!r} is not a model kind; use one of {', '.join(KINDS)}")
    if not folder.is_dir():
        raise ConfigError("folder", f"{folder}: no such folder")
    found = "ensemble" if (folder / ENSEMBLE_CONFIG).is_file() else "hf" if (folder / "config.json").is_file() else None
    if found is None:
        raise ConfigError("folder", f"{folder} is not a model folder of a cbtm run (no ensemble.json, no config.json)")
    if kind != "auto" and kind != found:
        raise ConfigError("kind", f"{kind} but {folder} holds a {found} model")
    return found


def load_model(folder: str | Path, kind: str = "auto", device: str = "auto", dtype=None,
               max_length: int | None = None, batch_size: int | None = None, name: str | None = None):
    """The `ScoringModel` of a model folder of a run: `HFCausalLM` for a save_pretrained folder, the ensemble
    (`experts.ensemble_folder.load_ensemble`, each expert called on at most `batch_size` rows) for an ensemble
    folder. dtype: a torch dtype, its name ('bfloat16') or 'auto'; name: the model's name in the run (default:
    the folder for a save_pretrained model, ensemble.json's name for an ensemble)."""
    import torch

    kind = model_kind(folder, kind)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    if kind == "ensemble":
        from experts.ensemble_folder import load_ensemble

        model = load_ensemble(folder, device=device, dtype=dtype, max_length=max_length, expert_batch_size=batch_size)
        if name is not None:
            model.name = name
        return model
    from experts.model import load_causal_lm
    from experts.scoring import HFCausalLM

    model, tokenizer = load_causal_lm(folder, dtype=dtype)
    return HFCausalLM(model, tokenizer, device=device, name=name or str(folder), max_length=max_length)

"""BTX merge (Sukhbaatar et al. 2024, "Branch-Train-MiX"): Llama experts → one `MixtralForCausalLM`.

Layer l of the MoE has one feed-forward expert per branch: expert j's (gate_proj, up_proj, down_proj) of
layer l become MoE expert j of layer l (optionally the seed's FFN as one more expert, as BTX did). Everything
else — attention, RMSNorms, embeddings, lm_head — is the uniform average of the experts (BTX), or, with
`shared_dir`, taken from one checkpoint of the same architecture: the seed, or a task-arithmetic / TIES merge of
the experts (`experts.merge`). Experts trained with only their FFNs against a frozen seed (FlexOlmo, Shi et al.
2025; `TrainConfig.trainable="ffn"`) share these weights exactly, so all three agree. Per token the router
picks the top_k experts, h ↦ Σ_{j∈top_k} softmax(W_r h)_j · FFN_j(h) (renormalised over the top_k).

Router initialisation: "random" (N(0, router_std²)); "hidden": row j = mean post-norm hidden state (the MLP
input) of cluster j's documents under expert j, L2-normalised, so routing starts out agreeing with the
clusterer; "centroids": the cluster centroids themselves when their dimension equals hidden_size (else
"hidden", with a warning). The expert-tensor layout of the installed transformers (per-expert modules or fused
3-D `gate_up_proj`/`down_proj`) is detected at run time by a numerical probe on a tiny model.
`finetune_moe` trains the merged model with the load-balancing loss and writes routing statistics.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from clustering.router import CentroidRouter
from corpus.io import InputError, write_json
from corpus.layout import MOE_INFO
from experts.average import CheckpointReader, check_expert_dirs, fill_meta_model, save_merged_model

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


# ---- layout of the installed MixtralForCausalLM --------------------------------------------------------------
def _mixtral_config(llama: dict, n_experts: int, top_k: int):
    from transformers import MixtralConfig

    if llama.get("attention_bias") or llama.get("mlp_bias"):
        raise InputError("Llama experts with attention_bias/mlp_bias have no Mixtral equivalent; cannot build an MoE")
    kw = dict(
        vocab_size=llama["vocab_size"], hidden_size=llama["hidden_size"], intermediate_size=llama["intermediate_size"],
        num_hidden_layers=llama["num_hidden_layers"], num_attention_heads=llama["num_attention_heads"],
        num_key_value_heads=llama.get("num_key_value_heads") or llama["num_attention_heads"],
        head_dim=llama.get("head_dim") or llama["hidden_size"] // llama["num_attention_heads"],
        hidden_act=llama.get("hidden_act", "silu"), max_position_embeddings=llama.get("max_position_embeddings", 2048),
        rms_norm_eps=llama.get("rms_norm_eps", 1e-6), tie_word_embeddings=llama.get("tie_word_embeddings", False),
        bos_token_id=llama.get("bos_token_id"), eos_token_id=llama.get("eos_token_id"),
        pad_token_id=llama.get("pad_token_id"), attention_dropout=llama.get("attention_dropout", 0.0),
        num_local_experts=n_experts, num_experts_per_tok=top_k, sliding_window=None,
        router_aux_loss_coef=0.01, output_router_logits=False, use_cache=llama.get("use_cache", True),
    )
    if "rope_parameters" in llama:
        kw["rope_parameters"] = llama["rope_parameters"]
    else:
        kw["rope_theta"] = llama.get("rope_theta", 10000.0)
        if llama.get("rope_scaling"):
            kw["rope_scaling"] = llama["rope_scaling"]
    return MixtralConfig(**kw)


def _candidate_layouts() -> dict[str, Callable]:
    """name → f(gate (E,I,H), up (E,I,H), down (E,H,I)) → {suffix under the MoE block: tensor}."""
    def fused(gate_first: bool, transposed: bool):
        def f(gate, up, down):
            gu = torch.cat([gate, up] if gate_first else [up, gate], dim=1)  # (E, 2I, H)
            if transposed:
                return {"experts.gate_up_proj": gu.transpose(1, 2).contiguous(), "experts.down_proj": down.transpose(1, 2).contiguous()}
            return {"experts.gate_up_proj": gu, "experts.down_proj": down}
        return f

    def per_expert(gate, up, down):
        out = {}
        for e in range(gate.shape[0]):
            out[f"experts.{e}.w1.weight"], out[f"experts.{e}.w3.weight"], out[f"experts.{e}.w2.weight"] = gate[e], up[e], down[e]
        return out

    return {"fused_gate_up": fused(True, False), "fused_up_gate": fused(False, False),
            "fused_gate_up_T": fused(True, True), "fused_up_gate_T": fused(False, True), "per_expert_w1w3w2": per_expert}


@functools.lru_cache(maxsize=1)
def detect_moe_layout() -> tuple[str, str, str]:
    """(layout name, MoE block attribute e.g. "mlp" or "block_sparse_moe", router key suffix e.g. "gate.weight").

    Builds a one-layer Mixtral with two identical experts copied from a Llama MLP under each candidate layout and
    keeps the one whose MoE block reproduces the Llama MLP exactly (identical experts ⇒ any routing gives it).
    """
    from transformers import LlamaConfig, MixtralForCausalLM
    from transformers.models.llama.modeling_llama import LlamaMLP

    H, I, E = 8, 12, 2
    llama = LlamaConfig(hidden_size=H, intermediate_size=I, num_attention_heads=2, num_hidden_layers=1, vocab_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mlp = LlamaMLP(llama).eval()
        moe = MixtralForCausalLM(_mixtral_config(llama.to_dict(), E, 1)).eval()
        x = torch.randn(1, 5, H)
    keys = [k for k in moe.state_dict() if k.startswith("model.layers.0.")]
    expert_keys = [k for k in keys if ".experts" in k]
    if not expert_keys:
        raise RuntimeError("cannot find expert weights in transformers' MixtralForCausalLM")
    block = expert_keys[0][len("model.layers.0."):].split(".experts")[0]  # e.g. "mlp"
    router = [k for k in keys if k.startswith(f"model.layers.0.{block}.") and ".experts" not in k]
    router_suffix = router[0][len(f"model.layers.0.{block}."):]
    module = getattr(moe.model.layers[0], block)
    gate = mlp.gate_proj.weight.detach()[None].repeat(E, 1, 1)
    up = mlp.up_proj.weight.detach()[None].repeat(E, 1, 1)
    down = mlp.down_proj.weight.detach()[None].repeat(E, 1, 1)
    with torch.no_grad():
        want = mlp(x)
        for name, f in _candidate_layouts().items():
            tensors = f(gate, up, down)
            sd = module.state_dict()
            if set(tensors) - set(sd) or any(sd[k].shape != v.shape for k, v in tensors.items()):
                continue
            sd.update(tensors)
            module.load_state_dict(sd)
            got = module(x)
            got = got[0] if isinstance(got, tuple) else got
            if torch.allclose(got, want, atol=1e-5):
                return name, block, router_suffix
    raise RuntimeError("no known expert layout matches the installed transformers' MixtralForCausalLM")


# ---- router initialisation -----------------------------------------------------------------------------------
@torch.no_grad()
def mean_mlp_inputs(expert_dir, texts: Sequence[str], max_length: int = 256, batch_size: int = 8,
                    device: str = "cpu") -> torch.Tensor:
    """(n_layers, H): mean over all tokens of `texts` of each layer's MLP input (post-attention RMSNorm output)."""
    from experts.model import load_causal_lm

    model, tok = load_causal_lm(expert_dir)
    model.to(device).eval()
    layers = model.model.layers
    sums = torch.zeros(len(layers), model.config.hidden_size, dtype=torch.float64)
    count = 0
    current_mask: list[torch.Tensor] = []

    def hook(layer_idx):
        def f(module, args):
            h = args[0].double()  # (B, T, H)
            m = current_mask[0][..., None].to(h)  # (B, T, 1)
            sums[layer_idx] += (h * m).sum((0, 1)).cpu()
        return f

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for b in range(0, len(texts), batch_size):
            enc = tok(list(texts[b : b + batch_size]), return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length)
            mask = enc["attention_mask"].to(device)
            current_mask[:] = [mask]
            model(input_ids=enc["input_ids"].to(device), attention_mask=mask)
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1)).float()


def _group_texts(cluster_texts, k, centroids, embedder) -> list[list[str]]:
    if cluster_texts is None:
        raise InputError("router_init='hidden' needs cluster_texts (per-cluster lists, or a flat list with embedder and centroids)")
    if len(cluster_texts) and isinstance(cluster_texts[0], str):  # flat list: assign by nearest centroid
        if embedder is None or centroids is None:
            raise InputError("a flat cluster_texts list needs embedder and centroids to assign texts to clusters")
        router = CentroidRouter(embedder, centroids)
        cluster_ids = router.assign(router.embed(cluster_texts))  # (n,)
        groups = [[] for _ in range(k)]
        for t, j in zip(cluster_texts, cluster_ids.tolist()):
            groups[j].append(t)
        cluster_texts = groups
    if len(cluster_texts) != k:
        raise InputError(f"cluster_texts has {len(cluster_texts)} clusters but there are {k} experts")
    return [list(g) for g in cluster_texts]


def _router_rows(router_init, expert_dirs, seed_dir, keep_seed, n_layers, H, router_std, centroids, embedder,
                 cluster_texts, generator) -> torch.Tensor:
    """(n_layers, E, H) router weights."""
    E = len(expert_dirs) + int(keep_seed)
    if router_init not in ("random", "centroids", "hidden"):
        raise InputError(f"router_init must be 'random', 'centroids' or 'hidden', got {router_init!r}")
    if router_init == "centroids":
        if centroids is None:
            raise InputError("router_init='centroids' needs the cluster centroids")
        c = torch.as_tensor(np.asarray(centroids, dtype=np.float32))
        if c.shape[0] != len(expert_dirs):
            raise InputError(f"{c.shape[0]} centroids but {len(expert_dirs)} experts")
        if c.shape[1] == H:
            rows = torch.nn.functional.normalize(c, dim=1)
            if keep_seed:
                rows = torch.cat([rows, torch.nn.functional.normalize(rows.mean(0, keepdim=True), dim=1)])
            return rows[None].repeat(n_layers, 1, 1)
        warnings.warn(f"centroid dimension {c.shape[1]} != hidden size {H}; initialising the router from mean hidden states")
        router_init = "hidden"
    if router_init == "hidden":
        groups = _group_texts(cluster_texts, len(expert_dirs), centroids, embedder)
        means = []
        for d, g in zip(expert_dirs, groups):
            if not g:
                raise InputError(f"no texts for the cluster of expert {d}; cannot initialise its router row")
            means.append(mean_mlp_inputs(d, g))  # (L, H)
        if keep_seed:
            means.append(mean_mlp_inputs(seed_dir, [t for g in groups for t in g]))
        return torch.nn.functional.normalize(torch.stack(means, 1), dim=-1)  # (L, E, H)
    return torch.randn(n_layers, E, H, generator=generator) * router_std


# ---- the merge -----------------------------------------------------------------------------------------------
def build_moe(
    expert_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    seed_dir: str | os.PathLike | None = None,
    keep_seed_expert: bool = False,
    router_init: str = "random",
    top_k: int = 2,
    router_std: float = 0.02,
    centroids: np.ndarray | None = None,
    embedder=None,
    cluster_texts: Sequence | None = None,
    seed: int = 0,
    shared_dir: str | os.PathLike | None = None,
) -> Path:
    """Merge Llama experts into a `MixtralForCausalLM` saved in `out_dir` (atomic; `save_pretrained` + tokenizer +
    `moe.json`). Returns `out_dir`, loadable with `AutoModelForCausalLM`.

    num_local_experts = k (+1 with keep_seed_expert, the seed's FFN last), num_experts_per_tok = top_k.
    Non-FFN weights: the experts' uniform average, or those of `shared_dir` when given (InputError naming the
    tensor when it lacks one or shapes it differently).
    """
    from transformers import MixtralForCausalLM

    expert_dirs = [Path(d) for d in expert_dirs]
    all_dirs = expert_dirs + ([Path(seed_dir)] if keep_seed_expert else [])
    if keep_seed_expert and seed_dir is None:
        raise InputError("keep_seed_expert=True needs seed_dir")
    configs = check_expert_dirs(all_dirs)
    for d, cfg in zip(all_dirs, configs):
        arch = (cfg.get("architectures") or [cfg.get("model_type")])[0]
        if arch not in SUPPORTED_ARCHITECTURES and cfg.get("model_type") != "llama":
            raise InputError(f"{d} is a {arch} model; the MoE merge supports only {', '.join(SUPPORTED_ARCHITECTURES)}")
    E = len(all_dirs)
    if not 1 <= top_k <= E:
        raise InputError(f"top_k must be between 1 and the number of MoE experts ({E}), got {top_k}")
    layout, block, router_suffix = detect_moe_layout()
    to_layout = _candidate_layouts()[layout]
    llama = configs[0]
    config = _mixtral_config(llama, E, top_k)
    L, H = llama["num_hidden_layers"], llama["hidden_size"]

    readers = [CheckpointReader(d) for d in all_dirs]
    shared = None
    if shared_dir is not None:
        if not Path(shared_dir).is_dir():
            raise InputError(f"directory of the MoE's shared (non-FFN) weights does not exist: {shared_dir}")
        shared = CheckpointReader(shared_dir)
    n_avg = len(expert_dirs)  # attention, norms, embeddings: average of the experts (not the seed), or `shared`
    state: dict[str, torch.Tensor] = {}
    mlp_names = ("gate_proj", "up_proj", "down_proj")
    for key in readers[0].keys():
        parts = key.split(".")
        if len(parts) > 4 and parts[3] == "mlp" and parts[4] in mlp_names:
            continue
        if shared is None:
            state[key] = sum(r.get(key).float() for r in readers[:n_avg]) / n_avg
            continue
        if key not in shared.where or shared.shape(key) != readers[0].shape(key):
            found = f"shape {shared.shape(key)}" if key in shared.where else "no such tensor"
            raise InputError(f"tensor {key} has shape {readers[0].shape(key)} in the experts but {found} in "
                             f"{shared_dir}; the MoE's shared weights must come from a model of the experts' architecture")
        state[key] = shared.get(key).float()
    for layer in range(L):
        w = {n: torch.stack([r.get(f"model.layers.{layer}.mlp.{n}.weight").float() for r in readers]) for n in mlp_names}
        for suffix, t in to_layout(w["gate_proj"], w["up_proj"], w["down_proj"]).items():
            state[f"model.layers.{layer}.{block}.{suffix}"] = t
    gen = torch.Generator().manual_seed(seed)
    rows = _router_rows(router_init, expert_dirs, seed_dir, keep_seed_expert, L, H, router_std, centroids,
                        embedder, cluster_texts, gen)  # (L, E, H)
    for layer in range(L):
        state[f"model.layers.{layer}.{block}.{router_suffix}"] = rows[layer].float().contiguous()

    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    fill_meta_model(model, state, "the experts")
    out_dir = save_merged_model(model, expert_dirs[0], out_dir, MOE_INFO, {
        "experts": [str(d) for d in expert_dirs], "seed": str(seed_dir) if seed_dir else None,
        "shared": str(shared_dir) if shared_dir is not None else "average of the experts",
        "keep_seed_expert": keep_seed_expert, "router_init": router_init, "top_k": top_k, "router_std": router_std,
        "num_local_experts": E, "layout": layout})
    log.info("built MoE with %d experts per layer (top-%d, router %s) in %s", E, top_k, router_init, out_dir)
    return out_dir


# ---- finetuning and routing statistics ------------------------------------------------------------------------
@torch.no_grad()
def routing_stats(model, blocks: torch.Tensor, batch_size: int = 8) -> dict:
    """Routing statistics of an MoE over token blocks (n, T): per layer, the fraction of routed token slots each
    expert receives (load), the entropy of the mean router distribution, and the mean per-token entropy (nats)."""
    model.eval()
    E = model.config.num_local_experts
    top_k = model.config.num_experts_per_tok
    device = next(model.parameters()).device
    load, probs_sum, tok_entropy, n_tok = None, None, None, 0
    for b in range(0, len(blocks), batch_size):
        x = blocks[b : b + batch_size].to(device)
        out = model(input_ids=x, output_router_logits=True)
        logits = torch.stack([r.float().reshape(-1, E) for r in out.router_logits])  # (L, N, E)
        p = torch.softmax(logits, -1)
        sel = torch.topk(p, top_k, -1).indices  # (L, N, top_k)
        counts = torch.zeros(p.shape[0], E, device=p.device).scatter_add_(1, sel.flatten(1), torch.ones_like(sel.flatten(1), dtype=torch.float))
        ent = -(p * p.clamp_min(1e-12).log()).sum(-1).sum(1)  # (L,)
        load = counts if load is None else load + counts
        probs_sum = p.sum(1) if probs_sum is None else probs_sum + p.sum(1)
        tok_entropy = ent if tok_entropy is None else tok_entropy + ent
        n_tok += p.shape[1]
    load = (load / load.sum(1, keepdim=True)).cpu()
    mean_p = (probs_sum / n_tok).cpu()
    return {
        "tokens": n_tok,
        "per_expert_load": load.tolist(),  # (L, E) fraction of routed slots
        "mean_router_entropy": (-(mean_p * mean_p.clamp_min(1e-12).log()).sum(1)).tolist(),  # (L,)
        "per_token_entropy": (tok_entropy / n_tok).cpu().tolist(),  # (L,)
        "max_entropy": math.log(E),
    }


def finetune_moe(moe_dir: str | os.PathLike, shard_paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 config=None, router_aux_loss_coef: float = 0.01, stat_blocks: int = 32, **train_kw) -> dict:
    """BTX finetuning: `experts.training.train_model` on a mix of all clusters' shards with the load-balancing loss
    (`router_aux_loss_coef`, BTX used 0.01), then `routing_stats` (per layer: per-token routing entropy, entropy
    of the mean router distribution, per-expert load) over `stat_blocks` blocks of the validation shards
    (`valid_paths`; the training shards without them) written to `out_dir/routing.json`. Returns train_model's
    result with a "routing" entry."""
    import dataclasses

    from experts.model import load_causal_lm
    from experts.training import TrainConfig, train_model

    if config is None:
        raise InputError("finetune_moe needs a TrainConfig (at least train_tokens)")
    if not isinstance(config, TrainConfig):
        config = TrainConfig(**config)
    if config.router_aux_loss_coef == 0 and router_aux_loss_coef:
        config = dataclasses.replace(config, router_aux_loss_coef=router_aux_loss_coef)
    if not (Path(moe_dir) / "config.json").is_file():
        raise InputError(f"MoE directory missing or incomplete: {moe_dir}")
    result = train_model(str(moe_dir), list(shard_paths), out_dir, config, **train_kw)
    model, _ = load_causal_lm(out_dir)
    from corpus.device import resolve_device

    model.to(resolve_device(config.device).device)
    stat_paths = list(train_kw.get("valid_paths") or shard_paths)  # held-out blocks when there are some
    per_shard = max(1, stat_blocks // max(1, len(stat_paths)))
    blocks = np.concatenate([np.asarray(np.load(p, mmap_mode="r")[:per_shard]) for p in stat_paths])
    stats = routing_stats(model, torch.as_tensor(blocks.astype(np.int64)))
    stats["router_aux_loss_coef"] = config.router_aux_loss_coef
    write_json(Path(out_dir) / "routing.json", stats)
    result = dict(result or {})
    result["routing"] = stats
    return result

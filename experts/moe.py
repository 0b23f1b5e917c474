"""BTX merge (Sukhbaatar et al. 2024, "Branch-Train-MiX"): dense experts → one mixture-of-experts model of their
family (`experts.families`: Llama, Mistral → `MixtralForCausalLM`; Qwen2 → `Qwen2MoeForCausalLM`; Qwen3 →
`Qwen3MoeForCausalLM`, each keeping the family's attention biases and q/k norms).

Layer l of the MoE has one feed-forward expert per branch: expert j's (gate_proj, up_proj, down_proj) of
layer l become MoE expert j of layer l (optionally the seed's FFN as one more expert, as BTX did). Everything
else — attention, norms, embeddings, lm_head — is the uniform average of the experts (BTX), or, with
`shared_dir`, taken from one checkpoint of the same architecture: the seed, or a task-arithmetic / TIES merge of
the experts (`experts.merge`). Experts trained with only their FFNs against a frozen seed (FlexOlmo, Shi et al.
2025; `TrainConfig.trainable="ffn"`) share these weights exactly, so all three agree. Per token the router
picks the top_k experts, h ↦ Σ_{j∈top_k} softmax(W_r h)_j · FFN_j(h) (renormalised over the top_k).

Router initialisation (`build_moe`): "random", "hidden" (mean MLP inputs of each cluster's documents), or
"centroids" (the cluster centroids, mapped into the hidden space by least squares when their dimension differs
from the hidden size, as TF-IDF's 100 always does). The expert-tensor layout of the installed transformers
(per-expert modules or fused 3-D `gate_up_proj`/`down_proj`) is detected at run time by a numerical probe on a
tiny model. `build_moe_merge` is the `moe` entry of `experts.merging.MERGE_METHODS`. `finetune_moe` trains the
merged model with the load-balancing loss and writes routing statistics.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from clustering.router import CentroidRouter
from corpus.io import InputError, load_array, read_json, write_json
from corpus.layout import CENTROIDS, MOE_INFO
from experts.merge_io import CheckpointReader, check_expert_dirs, fill_meta_model, save_merged_model
from experts.merging import ROUTER_INITS, MergeInputs, MergeMethod

log = logging.getLogger(__name__)

MOE_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
"""The transformers MoE class of each target model_type of `experts.families` (the dense family → target map)."""
_NOT_COPIED = {"model_type", "architectures", "transformers_version", "auto_map", "_name_or_path", "dtype",
               "torch_dtype", "intermediate_size", "layer_types", "max_window_layers", "use_sliding_window",
               "sliding_window"}


# ---- the MoE model of a dense family ---------------------------------------------------------------------------
def moe_target(dense: dict, where: str = "the experts") -> str:
    """The MoE model_type the BTX merge builds from a dense config.json `dense`; InputError (naming the families
    that have one) otherwise."""
    from experts.families import FAMILIES, moe_support

    target, why = moe_support(dense.get("model_type"))
    if target is None:
        works = ", ".join(f.name for f in FAMILIES.values() if f.moe)
        raise InputError(f"{where} are {dense.get('model_type')!r} models: {why}; the MoE merge supports {works}")
    if dense.get("model_type") == "llama" and (dense.get("attention_bias") or dense.get("mlp_bias")):
        raise InputError(f"{where} are Llama models with attention_bias/mlp_bias, which Mixtral lacks; cannot build an MoE")
    return target


def _moe_config(dense: dict, n_experts: int, top_k: int, target: str | None = None):
    """The config of the `target` MoE (default: `moe_target(dense)`) with `n_experts` copies of the dense model's
    FFN per layer, every other field the dense model's (attention, biases, q/k norms, rotary embedding,
    vocabulary, tied embeddings). Qwen2-MoE's shared expert is left empty (size 0): BTX has none."""
    from transformers import CONFIG_MAPPING

    target = target or moe_target(dense)
    cls = CONFIG_MAPPING[target]
    known = set(cls().to_dict())
    kw = {k: v for k, v in dense.items() if k in known and k not in _NOT_COPIED}
    kw.update(num_experts_per_tok=top_k, router_aux_loss_coef=0.01, output_router_logits=False)
    if dense.get("sliding_window") and dense.get("use_sliding_window", True):
        kw["sliding_window"] = dense["sliding_window"]
        if "use_sliding_window" in known:
            kw["use_sliding_window"] = True
    elif "sliding_window" in known:
        kw["sliding_window"] = None
    if target == "mixtral":
        kw.update(num_local_experts=n_experts, intermediate_size=dense["intermediate_size"], router_jitter_noise=0.0)
        kw.setdefault("head_dim", dense.get("head_dim") or dense["hidden_size"] // dense["num_attention_heads"])
    else:  # qwen2_moe, qwen3_moe: every layer sparse, routing weights renormalised over the top_k (as Mixtral)
        kw.update(num_experts=n_experts, moe_intermediate_size=dense["intermediate_size"], decoder_sparse_step=1,
                  mlp_only_layers=[], norm_topk_prob=True)
        if target == "qwen2_moe":
            kw.update(shared_expert_intermediate_size=0, qkv_bias=True)
    if "rope_parameters" not in dense and "rope_theta" in dense:
        kw["rope_theta"] = dense["rope_theta"]
        if dense.get("rope_scaling"):
            kw["rope_scaling"] = dense["rope_scaling"]
    return cls(**kw)


def num_experts(config) -> int | None:
    """Experts per layer of an MoE config (Mixtral's num_local_experts, Qwen-MoE's num_experts); None if dense."""
    return getattr(config, "num_local_experts", None) or (getattr(config, "num_experts", None)
                                                          if config.model_type in MOE_CLASSES else None)


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


@functools.lru_cache(maxsize=None)
def detect_moe_layout(target: str = "mixtral") -> tuple[str, str, str]:
    """(layout name, MoE block attribute e.g. "mlp", router key suffix e.g. "gate.weight") of the `target` MoE class.

    Builds a one-layer `target` MoE with two identical experts copied from a Llama MLP (gate/up/down, SiLU: the MLP
    of every family with an MoE) under each candidate layout and keeps the one whose MoE block reproduces that MLP
    exactly (identical experts ⇒ any routing gives it).
    """
    import transformers
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    H, I, E = 8, 12, 2
    llama = LlamaConfig(hidden_size=H, intermediate_size=I, num_attention_heads=2, num_hidden_layers=1, vocab_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mlp = LlamaMLP(llama).eval()
        moe = getattr(transformers, MOE_CLASSES[target])(_moe_config(llama.to_dict(), E, 1, target)).eval()
        x = torch.randn(1, 5, H)
    keys = [k for k in moe.state_dict() if k.startswith("model.layers.0.")]
    expert_keys = [k for k in keys if ".experts" in k]
    if not expert_keys:
        raise RuntimeError(f"cannot find expert weights in transformers' {MOE_CLASSES[target]}")
    block = expert_keys[0][len("model.layers.0."):].split(".experts")[0]  # e.g. "mlp"
    router = [k for k in keys if k.startswith(f"model.layers.0.{block}.") and ".experts" not in k
              and ".shared_expert" not in k]
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
    raise RuntimeError(f"no known expert layout matches the installed transformers' {MOE_CLASSES[target]}")


# ---- router initialisation -----------------------------------------------------------------------------------
@torch.no_grad()
def mean_mlp_inputs(model_dir, texts: Sequence[str], max_length: int = 256, batch_size: int = 8,
                    device: str = "cpu", per_text: bool = False) -> torch.Tensor:
    """Each layer's MLP input (the post-attention norm's output) averaged over the tokens of `texts`:
    (n_layers, H) over all texts, or with `per_text` (n_layers, n_texts, H), one mean per text.

    Texts are padded on the right, with the tokenizer's eos (or unk) as pad when it has no pad token (Llama,
    Mistral, GPT-2 ship without one); padding is masked out of the means."""
    from experts.model import load_causal_lm

    model, tok = load_causal_lm(model_dir)
    model.to(device).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if tok.pad_token_id is None:
        batch_size = 1  # nothing to pad with: one text at a time
    tok.padding_side = "right"
    layers = model.model.layers
    H = model.config.hidden_size
    sums = torch.zeros(len(layers), len(texts) if per_text else 1, H, dtype=torch.float64)
    counts = torch.zeros(len(texts) if per_text else 1, dtype=torch.float64)
    rows: list[slice] = [slice(0, 1)]
    current_mask: list[torch.Tensor] = []

    def hook(layer_idx):
        def f(module, args):
            h = args[0].double()  # (B, T, H)
            m = current_mask[0][..., None].to(h)  # (B, T, 1)
            s = (h * m).sum(1).cpu()  # (B, H)
            sums[layer_idx, rows[0]] += s if per_text else s.sum(0, keepdim=True)
        return f

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for b in range(0, len(texts), batch_size):
            enc = tok(list(texts[b : b + batch_size]), return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length)
            mask = enc["attention_mask"].to(device)
            current_mask[:] = [mask]
            rows[0] = slice(b, b + mask.shape[0]) if per_text else slice(0, 1)
            model(input_ids=enc["input_ids"].to(device), attention_mask=mask)
            n = mask.sum(1).double().cpu()
            counts[rows[0]] += n if per_text else n.sum()
    finally:
        for h in handles:
            h.remove()
    out = (sums / counts.clamp_min(1)[None, :, None]).float()  # (L, n | 1, H)
    return out if per_text else out[:, 0]


def fit_hidden_to_embedding(hidden: torch.Tensor, embeddings: np.ndarray, ridge: float = 1e-3) -> torch.Tensor:
    """Per layer, the linear map A_l (D, H) from documents' mean hidden states to their embeddings by ridge
    least squares: A_l = argmin_A Σ_d ‖e_d − A h_{l,d}‖² + λ‖A‖², λ = `ridge` × mean ‖h‖²,
    i.e. A_lᵀ = (X_lᵀ X_l + λ I)⁻¹ X_lᵀ E with X_l (n, H) the hidden states, E (n, D) the embeddings.

    hidden (L, n, H), embeddings (n, D) → (L, D, H)."""
    X = hidden.double()  # (L, n, H)
    E = torch.as_tensor(np.asarray(embeddings, dtype=np.float64))  # (n, D)
    if X.shape[1] != E.shape[0]:
        raise InputError(f"{X.shape[1]} hidden-state rows but {E.shape[0]} embeddings")
    H = X.shape[-1]
    out = []
    for Xl in X:
        lam = ridge * float((Xl * Xl).sum(1).mean()) + 1e-12
        At = torch.linalg.solve(Xl.T @ Xl + lam * torch.eye(H, dtype=X.dtype), Xl.T @ E)  # (H, D)
        out.append(At.T)
    return torch.stack(out).float()  # (L, D, H)


def _group_texts(cluster_texts, k, centroids, embedder) -> list[list[str]]:
    if cluster_texts is None:
        raise InputError("router_init 'hidden' and 'centroids' need cluster_texts (per-cluster lists, or a flat list "
                         "with embedder and centroids)")
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
                 cluster_texts, generator) -> tuple[torch.Tensor, dict]:
    """((n_layers, E, H) router weights, the record of what initialised them)."""
    E = len(expert_dirs) + int(keep_seed)
    if router_init not in ROUTER_INITS:
        raise InputError(f"router_init must be one of {', '.join(ROUTER_INITS)}, got {router_init!r}")
    if router_init == "centroids":
        if centroids is None:
            raise InputError("router_init='centroids' needs the cluster centroids")
        c = torch.as_tensor(np.asarray(centroids, dtype=np.float32))  # (k, D)
        if c.shape[0] != len(expert_dirs):
            raise InputError(f"{c.shape[0]} centroids but {len(expert_dirs)} experts")
        if c.shape[1] == H:
            rows = torch.nn.functional.normalize(c, dim=1)
            if keep_seed:
                rows = torch.cat([rows, torch.nn.functional.normalize(rows.mean(0, keepdim=True), dim=1)])
            return rows[None].repeat(n_layers, 1, 1), {"router_init": "centroids", "method": "centroids as router rows"}
        if embedder is None:
            raise InputError(f"centroids of dimension {c.shape[1]} != hidden size {H} need the embedder to map "
                             "hidden states to the embedding space")
        groups = _group_texts(cluster_texts, len(expert_dirs), centroids, embedder)
        texts = [t for g in groups for t in g]
        if len(texts) < 2:
            raise InputError("router_init='centroids' needs training documents to fit the hidden-to-embedding map")
        model_dir = seed_dir if seed_dir is not None else expert_dirs[0]
        hidden = mean_mlp_inputs(model_dir, texts, per_text=True)  # (L, n, H)
        emb = np.asarray(embedder.transform(texts), dtype=np.float32)  # (n, D)
        A = fit_hidden_to_embedding(hidden, emb)  # (L, D, H)
        fit = torch.einsum("ldh,lnh->lnd", A, hidden)  # (L, n, D)
        e = torch.as_tensor(emb)
        r2 = (1 - ((fit - e) ** 2).sum((1, 2)) / ((e - e.mean(0)) ** 2).sum()).tolist()  # (L,)
        rows = torch.einsum("kd,ldh->lkh", c, A)  # (L, k, H): logit_j ∝ c_j·(A_l h), the mapped centroid score
        if keep_seed:
            rows = torch.cat([rows, rows.mean(1, keepdim=True)], 1)
        rows = torch.nn.functional.normalize(rows, dim=-1)  # unit rows, as the other inits (scale: bench/RESULTS.md)
        return rows, {"router_init": "centroids", "method": "centroids through a least-squares map from mean hidden "
                      "states to the embedding space (router row ∝ A_lᵀ c_j, unit norm)", "fit_documents": len(texts),
                      "fit_model": str(model_dir), "embedding_dim": int(c.shape[1]), "hidden_size": H,
                      "fit_r2_per_layer": [round(v, 4) for v in r2]}
    if router_init == "hidden":
        groups = _group_texts(cluster_texts, len(expert_dirs), centroids, embedder)
        means = []
        for d, g in zip(expert_dirs, groups):
            if not g:
                raise InputError(f"no texts for the cluster of expert {d}; cannot initialise its router row")
            means.append(mean_mlp_inputs(d, g))  # (L, H)
        if keep_seed:
            means.append(mean_mlp_inputs(seed_dir, [t for g in groups for t in g]))
        return torch.nn.functional.normalize(torch.stack(means, 1), dim=-1), {  # (L, E, H)
            "router_init": "hidden", "method": "mean hidden state of each cluster's documents under its expert",
            "fit_documents": sum(len(g) for g in groups)}
    return torch.randn(n_layers, E, H, generator=generator) * router_std, {
        "router_init": "random", "method": f"N(0, {router_std}²)"}


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
    """Merge dense experts into the MoE of their family (`experts.families`: Llama, Mistral → Mixtral; Qwen2 →
    Qwen2-MoE; Qwen3 → Qwen3-MoE) saved in `out_dir` (atomic; `save_pretrained` + tokenizer + `moe.json`).
    Returns `out_dir`, loadable with `AutoModelForCausalLM`.

    num experts = k (+1 with keep_seed_expert, the seed's FFN last), num_experts_per_tok = top_k.
    Non-FFN weights: the experts' uniform average, or those of `shared_dir` when given (InputError naming the
    tensor when it lacks one or shapes it differently). Router rows (`router_init`):
    random — N(0, router_std²);
    hidden — row j = mean MLP input of cluster j's texts under expert j, L2-normalised;
    centroids — the centroids themselves when their dimension is the hidden size, else through A_l, a
    least-squares map from documents' mean hidden states (under the seed) to their embeddings (`embedder`):
    row j ∝ A_lᵀ c_j, so logit_j ∝ c_j·(A_l h), the c-BTM score of the mapped hidden state (−‖e − c_j‖² up to a
    per-expert constant), rows L2-normalised like the other inits.
    moe.json records the init actually used ("router_init", and "router" with the method and fit).
    """
    import transformers

    expert_dirs = [Path(d) for d in expert_dirs]
    all_dirs = expert_dirs + ([Path(seed_dir)] if keep_seed_expert else [])
    if keep_seed_expert and seed_dir is None:
        raise InputError("keep_seed_expert=True needs seed_dir")
    configs = check_expert_dirs(all_dirs)
    target = moe_target(configs[0], f"experts {expert_dirs[0].parent}")
    E = len(all_dirs)
    if not 1 <= top_k <= E:
        raise InputError(f"top_k must be between 1 and the number of MoE experts ({E}), got {top_k}")
    layout, block, router_suffix = detect_moe_layout(target)
    to_layout = _candidate_layouts()[layout]
    dense = configs[0]
    config = _moe_config(dense, E, top_k, target)
    L, H = dense["num_hidden_layers"], dense["hidden_size"]

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
    rows, record = _router_rows(router_init, expert_dirs, seed_dir, keep_seed_expert, L, H, router_std, centroids,
                                embedder, cluster_texts, gen)  # (L, E, H)
    for layer in range(L):
        state[f"model.layers.{layer}.{block}.{router_suffix}"] = rows[layer].float().contiguous()

    with torch.device("meta"):
        model = getattr(transformers, MOE_CLASSES[target])(config)
    for name, p in model.named_parameters():  # Qwen2-MoE's shared expert: size 0, its gate 0 (BTX has none)
        if ".shared_expert" in name and name not in state:
            state[name] = torch.zeros(p.shape)
    fill_meta_model(model, state, "the experts")
    out_dir = save_merged_model(model, expert_dirs[0], out_dir, MOE_INFO, {
        "experts": [str(d) for d in expert_dirs], "seed": str(seed_dir) if seed_dir else None,
        "shared": str(shared_dir) if shared_dir is not None else "average of the experts",
        "keep_seed_expert": keep_seed_expert, "router_init": record["router_init"], "router": record,
        "top_k": top_k, "router_std": router_std, "num_local_experts": E, "architecture": MOE_CLASSES[target],
        "layout": layout})
    log.info("built %s with %d experts per layer (top-%d, router: %s) in %s", MOE_CLASSES[target], E, top_k,
             record["method"], out_dir)
    return out_dir


def build_moe_merge(method: MergeMethod, out: Path, inputs: MergeInputs) -> dict:
    """The `moe` build of `experts.merging.MERGE_METHODS`: `build_moe` of the inputs' experts, its router initialised
    from the clusters' training documents (`cluster_texts`), its shared weights from `inputs.moe_shared`."""
    from clustering.embed import load_embedder
    from experts.merging import cluster_texts  # imported here: build_moe's argument of that name is the texts

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


# ---- finetuning and routing statistics ------------------------------------------------------------------------
@torch.no_grad()
def routing_stats(model, blocks: torch.Tensor, batch_size: int = 8) -> dict:
    """Routing statistics of an MoE over token blocks (n, T): per layer, the fraction of routed token slots each
    expert receives (load), the entropy of the mean router distribution, and the mean per-token entropy (nats)."""
    model.eval()
    E = num_experts(model.config)
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

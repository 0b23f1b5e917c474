"""Every supported family (`experts.families`) through every merge: a tiny random model of each family, saved as a
user's download would be (family tokenizer, tied or untied head, bf16 or fp32, safetensors or pytorch_model.bin),
merged from identical experts, must give the seed's logits."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from corpus.io import InputError
from experts.families import FAMILIES, check_seed, folder_context_length, moe_support
from experts.merge import merge_experts
from experts.moe import build_moe, mean_mlp_inputs
from family_helpers import FAMILY_TYPES, MOE_TYPES, VOCAB, family_model, family_tokenizer, save_family

X = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
# how each family's seed is saved: the formats users download
SAVED_AS = {"gpt_neox": dict(tie=False), "opt": dict(bin_only=True), "phi": dict(dtype=torch.bfloat16),
            "qwen2": dict(tie=True), "gemma": dict(tie=True), "llama": dict(tie=False),
            "mistral": dict(dtype=torch.bfloat16)}


def _logits(folder) -> torch.Tensor:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(X).logits


@pytest.fixture(scope="module", params=FAMILY_TYPES)
def family(request, tmp_path_factory):
    t = request.param
    root = tmp_path_factory.mktemp(t)
    seed = save_family(root / "seed", t, **SAVED_AS.get(t, {}))
    experts = [shutil.copytree(seed, root / f"expert_{j}") for j in range(2)]
    return t, root, seed, experts


def test_every_family_is_listed():
    assert set(FAMILY_TYPES) == set(FAMILIES)
    assert {t for t in FAMILY_TYPES if moe_support(t)[0]} == set(MOE_TYPES)


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "dare_linear"])
def test_identical_experts_merge_to_the_seed(family, method):
    t, root, seed, experts = family
    out = merge_experts(experts, root / method, method, seed_dir=seed)
    torch.testing.assert_close(_logits(out), _logits(seed))


def test_identical_experts_moe_is_the_seed_or_refused(family, tmp_path):
    """Llama, Mistral → Mixtral; Qwen2 → Qwen2-MoE; Qwen3 → Qwen3-MoE give the seed's logits whatever the router
    (random rows here); the other families are refused in one line naming those that work."""
    t, root, seed, experts = family
    if t not in MOE_TYPES:
        with pytest.raises(InputError, match="supports Llama, Mistral, Qwen2, Qwen3"):
            build_moe(experts, tmp_path / "moe", seed_dir=seed)
        return
    out = build_moe(experts, tmp_path / "moe", seed_dir=seed, top_k=1, router_std=1.0)
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert moe.config.model_type == FAMILIES[t].moe
    torch.testing.assert_close(moe.eval()(X).logits, _logits(seed), rtol=1e-4, atol=1e-4)


def test_different_experts_average_through_the_model_names(family):
    """The average of two different experts is the average of their weights as the model class loads them
    (GPT-NeoX's embed_out is lm_head in transformers 5; GPT-2 and OPT tie or prefix their keys)."""
    t, root, seed, _ = family
    a = save_family(root / "a", t, seed=1, **SAVED_AS.get(t, {}))
    b = save_family(root / "b", t, seed=2, **SAVED_AS.get(t, {}))
    out = merge_experts([a, b], root / "avg_ab", "average")
    sa, sb = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).state_dict() for d in (a, b))
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for k, v in got.items():
        if v.is_floating_point() and k in sa:
            torch.testing.assert_close(v, (sa[k] + sb[k]) / 2, msg=k)


@pytest.mark.parametrize("t", ["llama", "gpt2"])
def test_mean_mlp_inputs_without_a_pad_token(t, tmp_path):
    """Llama / GPT-2 tokenizers ship without a pad token: the router's hidden states still batch (padding masked),
    and per text equal the one-text-at-a-time means."""
    if t not in MOE_TYPES:
        t = "llama"
    seed = save_family(tmp_path / "seed", t)
    texts = ["alpha beta gamma", "the goal of the patient recipe module and more words"]
    per = mean_mlp_inputs(seed, texts, per_text=True, batch_size=2)  # (L, 2, H)
    one = torch.stack([mean_mlp_inputs(seed, [s], batch_size=1) for s in texts], 1)
    torch.testing.assert_close(per, one, rtol=1e-4, atol=1e-5)


def test_context_through_the_attribute_map(tmp_path):
    """GPT-2 keeps its context in n_positions; the ensemble reads it through config.max_position_embeddings."""
    seed = save_family(tmp_path / "gpt2", "gpt2", context=40)
    assert folder_context_length(seed) == 40


def test_centroid_router_across_dimensions(tmp_path):
    """Centroids of another dimension than the hidden size route through the least-squares map: router rows
    (L, k, H) ∝ C A_l with unit norm, recorded as such in moe.json, and the MoE of identical experts is still the
    seed."""
    import json

    from merge_helpers import HashEmbedder

    seed = save_family(tmp_path / "seed", "qwen3")
    experts = [shutil.copytree(seed, tmp_path / f"e{j}") for j in range(2)]
    words = "alpha beta gamma delta the of and patient goal recipe module".split()
    rng = np.random.default_rng(0)
    texts = [[" ".join(rng.choice(words[6 * j: 6 * j + 5], 20)) for _ in range(12)] for j in range(2)]
    emb = HashEmbedder(dim=6)
    centroids = np.stack([emb.transform(g).mean(0) for g in texts]).astype(np.float32)  # (2, 6)
    out = build_moe(experts, tmp_path / "moe", seed_dir=seed, router_init="centroids", centroids=centroids,
                    embedder=emb, cluster_texts=texts)
    meta = json.loads((out / "moe.json").read_text())
    assert meta["router_init"] == "centroids" and "least-squares" in meta["router"]["method"]
    assert meta["router"]["embedding_dim"] == 6 and meta["router"]["fit_documents"] == 24
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    w = moe.model.layers[0].mlp.gate.weight  # (k, H)
    assert w.shape == (2, 32) and not torch.allclose(w[0], w[1])
    torch.testing.assert_close(w.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(moe(X).logits, _logits(seed), rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="embedder"):
        build_moe(experts, tmp_path / "moe2", router_init="centroids", centroids=centroids, cluster_texts=texts)


def test_check_seed_refuses_other_families_and_mismatched_tokenizers(tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    bloom = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=1, n_head=2)).save_pretrained(bloom)
    family_tokenizer("gpt2").save_pretrained(bloom)
    with pytest.raises(InputError, match=r"'bloom' model.*supported families: Llama \(llama\), Mistral"):
        check_seed(str(bloom))
    small = tmp_path / "small"
    family_model("llama", vocab=200).save_pretrained(small)
    family_tokenizer("llama", VOCAB).save_pretrained(small)
    with pytest.raises(InputError, match="tokenizer has 300 tokens but its embeddings only 200 rows"):
        check_seed(str(small))
    ok = save_family(tmp_path / "ok", "opt", bin_only=True)
    assert check_seed(str(ok)) == "opt"


def test_llama3_style_seed_moe(tmp_path):
    """A Llama-3.2-style seed (llama3 RoPE scaling, tied embeddings, grouped-query attention): the Mixtral of two
    identical experts keeps its rotary embedding and gives the seed's logits."""
    from family_helpers import family_config

    config = family_config("llama", tie=True)
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    torch.manual_seed(0)
    seed = tmp_path / "seed"
    model = AutoModelForCausalLM.from_config(config)
    save_family(seed, "llama", model=model)
    experts = [shutil.copytree(seed, tmp_path / f"e{j}") for j in range(2)]
    out = build_moe(experts, tmp_path / "moe", seed_dir=seed, router_std=1.0)
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert moe.config.rope_parameters["rope_type"] == "llama3" and moe.config.tie_word_embeddings
    x = torch.randint(3, VOCAB, (1, 100), generator=torch.Generator().manual_seed(1))  # beyond 32 positions
    torch.testing.assert_close(moe.eval()(x).logits, model.eval()(x).logits, rtol=1e-4, atol=1e-4)

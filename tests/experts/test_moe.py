"""BTX MoE merge: identical experts give the dense model whatever the router; export reloads; bad input."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from corpus.io import InputError
from experts.moe import build_moe, routing_stats
from merge_helpers import random_text, save_llama

X = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    d = tmp_path_factory.mktemp("experts")
    return [save_llama(d / f"e{s}", seed=s) for s in range(3)]


def _load(p):
    return AutoModelForCausalLM.from_pretrained(p).eval()


@pytest.mark.parametrize("top_k,router_std", [(1, 0.02), (2, 5.0)])
def test_identical_experts_equal_dense(experts, tmp_path, top_k, router_std):
    out = build_moe([experts[0]] * 3, tmp_path / "moe", top_k=top_k, router_std=router_std, seed=top_k)
    moe = _load(out)
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 3
    torch.testing.assert_close(moe(X).logits, _load(experts[0])(X).logits, rtol=1e-4, atol=1e-4)


def test_keep_seed_expert_and_averaging(experts, tmp_path):
    out = build_moe(experts[:2], tmp_path / "moe", seed_dir=experts[2], keep_seed_expert=True, top_k=2)
    moe = _load(out)
    assert moe.config.num_local_experts == 3 and moe.config.num_experts_per_tok == 2
    sd, e0, e1 = moe.state_dict(), _load(experts[0]).state_dict(), _load(experts[1]).state_dict()
    k = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(sd[k], (e0[k] + e1[k]) / 2)
    assert json.loads((out / "moe.json").read_text())["keep_seed_expert"] is True
    # routing stats are well formed
    stats = routing_stats(moe, X)
    load = np.array(stats["per_expert_load"])
    assert load.shape == (2, 3) and np.allclose(load.sum(1), 1)


def test_hidden_router_init_agrees_with_clusters(experts, tmp_path):
    texts = [[random_text(12, 10 * j + i) for i in range(3)] for j in range(2)]
    out = build_moe(experts[:2], tmp_path / "moe", router_init="hidden", cluster_texts=texts)
    w = _load(out).model.layers[0].mlp.gate.weight
    assert w.shape[0] == 2
    torch.testing.assert_close(w.norm(dim=1), torch.ones(2))


def test_reload_gives_same_logits(experts, tmp_path):
    out = build_moe(experts, tmp_path / "moe", router_std=1.0)
    a, b = _load(out), _load(out)
    torch.testing.assert_close(a(X).logits, b(X).logits)


def test_bad_input(experts, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(gpt)
    with pytest.raises(InputError, match="LlamaForCausalLM"):
        build_moe([gpt, gpt], tmp_path / "x")
    with pytest.raises(InputError, match="top_k"):
        build_moe(experts[:2], tmp_path / "x", top_k=3)
    with pytest.raises(InputError, match="does not exist"):
        build_moe([experts[0], tmp_path / "missing"], tmp_path / "x")
    with pytest.raises(InputError, match="cluster_texts"):
        build_moe(experts[:2], tmp_path / "x", router_init="hidden")
    assert not (tmp_path / "x").exists()

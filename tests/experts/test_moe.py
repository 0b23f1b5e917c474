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
    with pytest.raises(InputError, match="GPT-2.*supports Llama, Mistral, Qwen2, Qwen3"):
        build_moe([gpt, gpt], tmp_path / "x")
    with pytest.raises(InputError, match="top_k"):
        build_moe(experts[:2], tmp_path / "x", top_k=3)
    with pytest.raises(InputError, match="does not exist"):
        build_moe([experts[0], tmp_path / "missing"], tmp_path / "x")
    with pytest.raises(InputError, match="cluster_texts"):
        build_moe(experts[:2], tmp_path / "x", router_init="hidden")
    assert not (tmp_path / "x").exists()


def test_ffn_only_experts_share_the_seed_and_lose_nothing_in_the_moe(tmp_path):
    """FlexOlmo: experts trained with trainable='ffn' keep every non-FFN tensor of the seed bit for bit, so the
    MoE's shared weights are the seed's whichever source they come from; with identical routing rows (top-1 of
    one expert per cluster is then a tie) the MoE of one such expert equals it."""
    from safetensors.torch import load_file

    from experts.model import ModelPreset, build_scratch_model
    from experts.training import TrainConfig, train_model

    preset = ModelPreset(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, seq_len=16)
    seed_dir = tmp_path / "seed"
    build_scratch_model(preset, 64, seed=0).save_pretrained(seed_dir)
    rng = np.random.default_rng(0)
    experts = []
    for c in range(2):
        shard = tmp_path / f"cluster_{c}.npy"
        np.save(shard, rng.integers(8 * c, 8 * c + 8, (32, 16)).astype(np.uint16))
        cfg = TrainConfig(train_tokens=4 * 4 * 16, micro_batch_size=4, lr=1e-2, device="cpu", compile=False,
                          log_every=0, checkpoint_every=0, trainable="ffn")
        train_model(str(seed_dir), [str(shard)], tmp_path / f"e{c}", cfg)
        experts.append(tmp_path / f"e{c}")
    seed = load_file(str(seed_dir / "model.safetensors"))
    for e in experts:
        trained = load_file(str(e / "model.safetensors"))
        for k, v in seed.items():
            assert torch.equal(trained[k], v) != (".mlp." in k), k  # only the FFNs moved
    by_avg = build_moe(experts, tmp_path / "avg", top_k=1).joinpath("model.safetensors")
    by_seed = build_moe(experts, tmp_path / "seed_shared", top_k=1, shared_dir=seed_dir).joinpath("model.safetensors")
    a, b = load_file(str(by_avg)), load_file(str(by_seed))
    for k in seed:
        if ".mlp." not in k:
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], seed[k]), k
    one = build_moe([experts[0]] * 2, tmp_path / "one", top_k=1, router_std=0.0, shared_dir=seed_dir)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_load(one)(x).logits, _load(experts[0])(x).logits, rtol=1e-4, atol=1e-4)


def test_shared_weights_of_another_architecture_are_refused(experts, tmp_path):
    wide = save_llama(tmp_path / "wide", seed=0, hidden=32)
    with pytest.raises(InputError, match=r"tensor \S+ has shape \(64, 24\) in the experts but shape \(64, 32\)"):
        build_moe(experts[:2], tmp_path / "x", shared_dir=wide)
    with pytest.raises(InputError, match="does not exist"):
        build_moe(experts[:2], tmp_path / "x", shared_dir=tmp_path / "missing")
    assert not (tmp_path / "x").exists()

"""Seed model presets, loading, compatibility checks, FLOP counts."""
import json

import pytest
import torch

from corpus.io import InputError
from experts.model import (
    PRESETS, ModelPreset, build_scratch_model, check_compatible, count_params, flops_per_token, load_causal_lm,
)
from experts.tokenizer import train_tokenizer


def test_presets_have_the_advertised_sizes():
    with torch.device("meta"):
        sizes = {k: count_params(build_scratch_model(k, 32000)) for k in ("small", "base")}
    assert 30e6 < sizes["small"] < 42e6 and 120e6 < sizes["base"] < 140e6
    assert all(p.doc for p in PRESETS.values())
    tiny = build_scratch_model("tiny", 8192)
    assert tiny.config._attn_implementation == "sdpa" and tiny.config.max_position_embeddings == 256


def test_flops_per_token_formula():
    m = build_scratch_model(ModelPreset(32, 2, 4, 64, 16, tie_word_embeddings=False), 50)
    n_matmul = count_params(m, non_embedding=True) - 2 * (2 * 32) - 32  # minus RMSNorm weights
    assert flops_per_token(m.config, 16) == 6 * n_matmul + 12 * 2 * 32 * 16


def test_scratch_model_is_seeded():
    a, b = build_scratch_model("tiny", 300, seed=1), build_scratch_model("tiny", 300, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_load_round_trip_and_bad_paths(tmp_path):
    tok = train_tokenizer(["hello world"] * 10, tmp_path / "tok", vocab_size=280)
    model = build_scratch_model(ModelPreset(32, 1, 4, 64, 16), len(tok))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    m2, t2 = load_causal_lm(tmp_path / "m")
    x = torch.tensor([[0, 5, 7]])
    torch.testing.assert_close(m2(x).logits, model(x).logits)
    assert len(t2) == len(tok)
    check_compatible(m2, t2)

    with pytest.raises(InputError, match="does not exist"):
        load_causal_lm(tmp_path / "missing")
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(InputError, match="not a causal language model"):
        load_causal_lm(tmp_path / "vit")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="corrupt or unreadable checkpoint"):
        load_causal_lm(tmp_path / "m")
    small = build_scratch_model(ModelPreset(32, 1, 4, 64, 16), 100)
    with pytest.raises(InputError, match="tokenizer/vocab mismatch"):
        check_compatible(small, tok)


def test_mini_preset_for_gpu_studies():
    with torch.device("meta"):
        mini = build_scratch_model("mini", 16384)
    c = mini.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (256, 4, 4, 688)
    assert c.max_position_embeddings == 512 and 6.5e6 < count_params(mini) < 8e6

"""Task-arithmetic merges (task arithmetic, TIES, DARE) against a shared seed: invariants and bad input."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from corpus.io import InputError
from experts.merge import drop_and_rescale, elect_and_mean, merge_experts, merged_state, sample_blocks, trim
from experts.merging import PARAMETER_MERGES as METHODS, MergeRecipe
from merge_helpers import save_llama

X = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
SEED_METHODS = [m for m, spec in METHODS.items() if spec.uses_seed]


def _state(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A seed and three 'experts' of its architecture (independent random weights: large task vectors)."""
    d = tmp_path_factory.mktemp("models")
    return save_llama(d / "seed", seed=10), [save_llama(d / f"e{s}", seed=s) for s in range(3)]


def _close(a: dict, b: dict, **kw):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), **kw)


# ---- per-tensor operations ----------------------------------------------------------------------------------
def test_trim_keeps_the_largest_magnitudes():
    d = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.0]])
    torch.testing.assert_close(trim(d, 2 / 6), torch.tensor([[0.0, -5.0, 0.0], [2.0, 0.0, 0.0]]))
    assert trim(d, 1.0) is d


def test_dare_is_unbiased_and_keeps_one_minus_p():
    d = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    out = drop_and_rescale(d, 0.75, torch.Generator().manual_seed(2))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    torch.testing.assert_close(out[kept], d[kept] * 4)
    assert abs(out.sum().item() - d.sum().item()) < 0.02 * d.abs().sum().item()


def test_elect_and_mean_is_the_disjoint_mean():
    deltas = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, 0.0], [-1.0, -2.0, 0.0]])  # (k=3, 3)
    w = torch.tensor([1 / 3, 1 / 3, 1 / 3])
    # column 0: sign + (sum 3), agreeing 1, 3 → 2; column 1: sign − (sum −3), agreeing −2, −2 → −2; column 2: 0
    torch.testing.assert_close(elect_and_mean(deltas, w), torch.tensor([2.0, -2.0, 0.0]))


# ---- whole checkpoints ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", SEED_METHODS)
def test_zero_task_vectors_return_the_seed(models, method):
    seed, _ = models
    _close(merged_state([seed] * 3, method, seed, recipe=MergeRecipe(lam=1.3, density=0.3, drop_rate=0.6)),
           _state(seed))


@pytest.mark.parametrize("method,recipe", [("task_arithmetic", MergeRecipe()), ("ties", MergeRecipe(density=1.0)),
                                           ("dare_linear", MergeRecipe(drop_rate=0.0)),
                                           ("dare_ties", MergeRecipe(drop_rate=0.0))])
def test_identical_experts_return_that_expert(models, tmp_path, method, recipe):
    seed, experts = models
    out = merge_experts([experts[1]] * 3, tmp_path / method, method, seed_dir=seed, recipe=recipe)
    merged, expert = AutoModelForCausalLM.from_pretrained(out).eval(), AutoModelForCausalLM.from_pretrained(experts[1]).eval()
    torch.testing.assert_close(merged(X).logits, expert(X).logits)
    meta = json.loads((out / "merge.json").read_text())
    assert meta["method"] == method and meta["seed"] == str(seed) and meta["weights"] == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_copies_of_one_expert_merge_like_that_expert_alone(models, method):
    """Sparsified: k copies of an expert give what the expert alone gives (TIES: its trimmed task vector)."""
    seed, experts = models
    recipe = MergeRecipe(density=0.3, drop_rate=0.5, seed=3)
    alone = merged_state([experts[0]], method, seed, recipe=recipe)
    if method == "ties":
        _close(merged_state([experts[0]] * 3, method, seed, recipe=recipe), alone)
        s, e = _state(seed), _state(experts[0])
        k = "model.layers.0.mlp.up_proj.weight"
        torch.testing.assert_close(alone[k], s[k] + trim(e[k] - s[k], 0.3))
    assert alone.keys() == _state(seed).keys()


def test_dare_with_drop_zero_is_task_arithmetic(models):
    seed, experts = models
    w = [0.2, 0.5, 0.3]
    ta = merged_state(experts, "task_arithmetic", seed, w, MergeRecipe(lam=0.7))
    _close(merged_state(experts, "dare_linear", seed, w, MergeRecipe(lam=0.7, drop_rate=0.0)), ta)
    # and task arithmetic with λ = 1 is the weighted average
    _close(merged_state(experts, "task_arithmetic", seed, w, MergeRecipe(lam=1.0)),
           merged_state(experts, "average", None, w), rtol=1e-5, atol=1e-5)


def test_dare_is_seeded(models):
    seed, experts = models
    a = merged_state(experts, "dare_ties", seed, recipe=MergeRecipe(drop_rate=0.5, seed=1))
    b = merged_state(experts, "dare_ties", seed, recipe=MergeRecipe(drop_rate=0.5, seed=1))
    c = merged_state(experts, "dare_ties", seed, recipe=MergeRecipe(drop_rate=0.5, seed=2))
    _close(a, b)
    k = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(a[k], c[k])


def test_lambda_search_picks_the_best_value_on_the_blocks(models, tmp_path):
    """Two copies of one expert: λ = 1 gives that expert, so on blocks it fits best, λ = 1 must win."""
    seed, experts = models
    torch.manual_seed(0)
    expert = AutoModelForCausalLM.from_pretrained(experts[0]).eval()
    with torch.no_grad():  # blocks sampled from the expert itself
        blocks = expert.generate(torch.zeros(8, 1, dtype=torch.long), max_new_tokens=15, do_sample=True,
                                 top_k=0, pad_token_id=2).numpy()
    out = merge_experts([experts[0]] * 2, tmp_path / "ta", "task_arithmetic", seed_dir=seed,
                        lambdas=[0.0, 0.5, 1.0], valid_blocks=blocks)
    meta = json.loads((out / "merge.json").read_text())
    assert meta["recipe"]["lam"] == 1.0 and set(meta["lambda_search"]) == {"0.0", "0.5", "1.0"}
    assert meta["lambda_search"]["1.0"] < meta["lambda_search"]["0.0"]


def test_sample_blocks(tmp_path):
    for c, n in enumerate((30, 10)):
        np.save(tmp_path / f"s{c}.npy", np.full((n, 4), c, dtype=np.uint16))
    b = sample_blocks([tmp_path / "s0.npy", tmp_path / "s1.npy"], max_blocks=8)
    assert b.shape == (8, 4) and (b[:, 0] == 0).sum() == 6


# ---- bad input ----------------------------------------------------------------------------------------------
def test_bad_input(models, tmp_path):
    seed, experts = models
    wide = save_llama(tmp_path / "wide", seed=0, hidden=32)
    with pytest.raises(InputError, match=r"tensor \S+\.weight has shape \(64, 24\) in the seed .* but \(64, 32\) in expert .*wide"):
        merge_experts([wide, wide], tmp_path / "x", "ties", seed_dir=seed)
    deep = save_llama(tmp_path / "deep", seed=0, layers=3)
    with pytest.raises(InputError, match=r"has tensor model\.layers\.2\.\S+ that the seed \S+ lacks"):
        merge_experts([deep], tmp_path / "x", "task_arithmetic", seed_dir=seed)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(InputError, match="DARE drop rate must be in"):
            MergeRecipe(drop_rate=bad)
    with pytest.raises(InputError, match="density"):
        MergeRecipe(density=0.0)
    with pytest.raises(InputError, match="weights"):
        merge_experts(experts, tmp_path / "x", "ties", seed_dir=seed, weights=[1, -1, 1])
    with pytest.raises(InputError, match="3 experts"):
        merge_experts(experts, tmp_path / "x", "ties", seed_dir=seed, weights=[1, 1])
    with pytest.raises(InputError, match="needs the seed"):
        merge_experts(experts, tmp_path / "x", "ties")
    with pytest.raises(InputError, match="unknown parameter merge"):
        merge_experts(experts, tmp_path / "x", "soup", seed_dir=seed)
    with pytest.raises(InputError, match="validation blocks"):
        merge_experts(experts, tmp_path / "x", "ties", seed_dir=seed, lambdas=[0.5, 1.0])
    assert not (tmp_path / "x").exists()

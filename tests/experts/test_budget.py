"""Budget policy: compute matching by steps or tokens, shares by cluster size, whole blocks, one-line refusals."""
import pytest

from corpus.io import InputError
from experts.budget import apportion, cluster_shares, compute_budget, dense_batch_blocks, plan_budgets

SEQ = 64


def test_compute_budget_splits_every_token():
    b = compute_budget(1_000_000, 0.5, 4)
    assert b["seed_tokens"] + 4 * b["expert_tokens"] + b["rounding"] == 1_000_000


@pytest.mark.parametrize("policy", ["proportional", "uniform"])
def test_shares_sum_to_one_and_proportional_follows_cluster_tokens(policy):
    tokens = [1000, 3000, 500, 5500]
    s = cluster_shares(tokens, policy)
    assert abs(sum(s) - 1) < 1e-12
    if policy == "uniform":
        assert s == [0.25] * 4
    else:
        assert s == [t / 10_000 for t in tokens]
        assert sorted(range(4), key=s.__getitem__) == sorted(range(4), key=tokens.__getitem__)


def test_apportion_sums_exactly_and_stays_within_one_of_the_quota():
    shares = [0.196, 0.352, 0.214, 0.238]
    for units in (8, 13, 100, 1001):
        n = apportion(units, shares)
        assert sum(n) == units
        assert all(abs(nj - s * units) < 1 for nj, s in zip(n, shares))


@pytest.mark.parametrize("policy", ["proportional", "uniform"])
@pytest.mark.parametrize("w", [1, 2])
def test_steps_matching_equal_steps_and_tokens_sum_to_dense(policy, w):
    cluster_tokens = [45_000, 80_000, 49_000, 54_000]
    p = plan_budgets(1_200_000, 0.5, cluster_tokens, SEQ, batch_blocks=32, compute_match="steps",
                     expert_budget=policy, gpus_per_expert=w)
    dense, experts = p["dense"], p["experts"]
    assert dense["steps"] == 600_000 // (32 * SEQ) and dense["tokens"] == dense["steps"] * 32 * SEQ
    assert all(e["steps"] == dense["steps"] for e in experts)  # the paper's matching: same number of steps
    assert sum(e["batch_blocks"] for e in experts) == 32  # the dense batch, shared out in whole blocks
    assert all(e["batch_blocks"] % w == 0 and e["batch_blocks"] >= w for e in experts)
    assert p["expert_tokens_total"] + p["rounding"] == dense["tokens"] and p["rounding"] == 0
    assert p["seed"]["tokens"] + p["expert_tokens_total"] <= 1_200_000
    for e, s in zip(experts, cluster_shares(cluster_tokens, policy)):
        assert abs(e["batch_blocks"] - s * 32) < w  # whole blocks (per GPU) closest to the share
        assert e["tokens"] == e["steps"] * e["batch_blocks"] * SEQ
    if policy == "proportional":  # every expert passes over its data about as often as dense over all data
        epochs = [e["epochs"] for e in experts]
        assert max(epochs) / min(epochs) < 1.5


def test_tokens_matching_keeps_the_dense_batch_and_shares_the_steps():
    cluster_tokens = [45_000, 80_000, 49_000, 54_000]
    p = plan_budgets(1_200_000, 0.5, cluster_tokens, SEQ, batch_blocks=8, compute_match="tokens",
                     expert_budget="proportional")
    experts, dense = p["experts"], p["dense"]
    assert all(e["batch_blocks"] == 8 for e in experts)
    assert sum(e["steps"] for e in experts) == dense["steps"]
    assert p["expert_tokens_total"] == dense["tokens"] and p["rounding"] == 0
    u = plan_budgets(1_200_000, 0.5, cluster_tokens, SEQ, batch_blocks=8, compute_match="tokens",
                     expert_budget="uniform")
    assert {e["steps"] for e in u["experts"]} <= {dense["steps"] // 4, dense["steps"] // 4 + 1}


def test_rounding_is_reported_when_the_batch_does_not_split_over_the_gpus():
    p = plan_budgets(1_000_000, 0.5, [10_000] * 2, SEQ, batch_blocks=9, compute_match="steps",
                     expert_budget="uniform", gpus_per_expert=2)
    assert [e["batch_blocks"] for e in p["experts"]] == [4, 4]
    assert p["rounding"] == p["dense"]["steps"] * SEQ  # one block per step could not be handed out
    assert p["expert_tokens_total"] + p["rounding"] == p["dense"]["tokens"]


def test_sub_block_share_trains_one_block_per_step_for_fewer_steps_with_the_same_tokens():
    # k = 16 on a dense batch of 8 blocks (CPU's default): every share is below one block
    cluster_tokens = [3_000 + 997 * j for j in range(16)]
    p = plan_budgets(3_000_000, 0.8, cluster_tokens, SEQ, batch_blocks=8)
    dense, experts = p["dense"], p["experts"]
    assert p["small_share"] == "fewer_steps" and all(e["small"] for e in experts)
    assert all(e["batch_blocks"] == 1 and 1 <= e["steps"] < dense["steps"] for e in experts)
    assert p["expert_tokens_total"] + p["rounding"] == dense["tokens"] and 0 <= p["rounding"] < dense["steps"] * SEQ
    for e, s in zip(experts, cluster_shares(cluster_tokens)):  # each expert gets its share of the tokens
        assert abs(e["tokens"] - s * dense["tokens"]) <= dense["steps"] * SEQ / 16 + SEQ
    # mixed: two small clusters, the others keep the dense model's steps; Σ tokens still the dense model's
    mixed = plan_budgets(10_000_000, 0.5, [100, 300, 5000, 5000, 5000], SEQ, batch_blocks=16)
    small = [e for e in mixed["experts"] if e["small"]]
    assert [e["cluster_id"] for e in small] == [0, 1] and all(e["batch_blocks"] == 1 for e in small)
    assert small[0]["steps"] < small[1]["steps"] < mixed["dense"]["steps"]
    assert all(e["steps"] == mixed["dense"]["steps"] for e in mixed["experts"] if not e["small"])
    assert mixed["expert_tokens_total"] + mixed["rounding"] == mixed["dense"]["tokens"]
    assert 0 <= mixed["rounding"] < mixed["dense"]["steps"] * SEQ
    # no small share: the same plan as before the rule (all steps equal, the whole batch handed out)
    big = plan_budgets(1_200_000, 0.5, [45_000, 80_000, 49_000, 54_000], SEQ, batch_blocks=32)
    assert not any(e["small"] for e in big["experts"]) and big["rounding"] == 0


def test_one_block_rule_takes_the_blocks_from_the_larger_experts():
    p = plan_budgets(10_000_000, 0.5, [100, 300, 5000, 5000, 5000], SEQ, batch_blocks=16, small_share="one_block")
    assert all(e["steps"] == p["dense"]["steps"] for e in p["experts"])
    assert [e["batch_blocks"] for e in p["experts"]][:2] == [1, 1]
    assert sum(e["batch_blocks"] for e in p["experts"]) == 16 and p["rounding"] == 0
    with pytest.raises(InputError, match="--small-share one_block .* 16 clusters"):  # k > B: cannot
        plan_budgets(3_000_000, 0.8, [3_000] * 16, SEQ, batch_blocks=8, small_share="one_block")
    with pytest.raises(InputError, match="--small-share 'x'"):
        plan_budgets(3_000_000, 0.8, [3_000] * 2, SEQ, batch_blocks=8, small_share="x")


def test_sub_step_share_empty_cluster_and_a_budget_below_one_block_per_expert():
    with pytest.raises(InputError, match="cluster 0's share .* steps is .*--compute-match steps"):
        plan_budgets(20_000, 0.5, [1, 5000, 5000, 5000], SEQ, batch_blocks=8, compute_match="tokens")
    with pytest.raises(InputError) as err:
        plan_budgets(1_000_000, 0.5, [5000, 0, 5000], SEQ, batch_blocks=8)
    assert str(err.value).startswith("cluster(s) 1 have no training tokens") and "\n" not in str(err.value)
    # a cluster whose share of all the dense model's tokens is below one block still trains one block
    tiny = plan_budgets(40_000, 0.5, [1, 50_000, 50_000], SEQ, batch_blocks=8)
    assert (tiny["experts"][0]["steps"], tiny["experts"][0]["batch_blocks"]) == (1, 1)
    assert tiny["expert_tokens_total"] + tiny["rounding"] == tiny["dense"]["tokens"] and tiny["rounding"] >= 0
    with pytest.raises(InputError, match="cannot give one block to each of the 8 experts whose share"):
        plan_budgets(10 * SEQ, 0.5, [10] * 8, SEQ, batch_blocks=1)  # 5 block-steps for the dense model, 8 experts
    with pytest.raises(InputError, match="--compute-match 'flops'"):
        plan_budgets(1_000_000, 0.5, [5000], SEQ, batch_blocks=8, compute_match="flops")
    with pytest.raises(InputError, match="--expert-budget"):
        cluster_shares([1, 2], "equal")


def test_dense_batch_blocks():
    assert dense_batch_blocks(0, 256, 8) == 8
    assert dense_batch_blocks(65_536, 512, 8) == 128
    with pytest.raises(InputError, match="--batch-tokens 100"):
        dense_batch_blocks(100, 512, 8)

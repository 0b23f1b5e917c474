"""Parameter averaging: copies of one expert give it back, one-hot weights pick an expert, bad input refused."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from corpus.io import InputError
from experts.merge import average_experts, branch_average
from merge_helpers import save_llama

X = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()(X).logits


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    d = tmp_path_factory.mktemp("experts")
    return [save_llama(d / f"e{s}", seed=s) for s in range(3)]


def test_average_of_copies_is_the_expert(experts, tmp_path):
    out = average_experts([experts[0]] * 3, tmp_path / "avg")
    torch.testing.assert_close(_logits(out), _logits(experts[0]))


def test_one_hot_weights_pick_that_expert(experts, tmp_path):
    out = average_experts(experts, tmp_path / "avg", weights=[0, 5.0, 0])
    torch.testing.assert_close(_logits(out), _logits(experts[1]))


def test_uniform_average_is_the_parameter_mean(experts, tmp_path):
    out = average_experts(experts[:2], tmp_path / "avg")
    m = [AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (experts[0], experts[1], out)]
    for k in m[2]:
        torch.testing.assert_close(m[2][k], (m[0][k] + m[1][k]) / 2)


def test_branch_average_weighs_experts_by_centroid_distance(experts, tmp_path):
    """The new cluster's centroid is at squared distances 1 and 4 from the experts' centroids: w ∝ exp(−d²/T)."""
    centroids = torch.tensor([[0.0, 0.0], [3.0, 0.0]]).numpy()
    out = branch_average(experts[:2], centroids, torch.tensor([1.0, 0.0]).numpy(), 1.0, tmp_path / "branch")
    w = torch.softmax(torch.tensor([-1.0, -4.0]), 0)
    m = [AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (experts[0], experts[1], out)]
    for k in m[2]:
        torch.testing.assert_close(m[2][k], w[0] * m[0][k] + w[1] * m[1][k])


def test_bad_input(experts, tmp_path):
    other = save_llama(tmp_path / "big_vocab", seed=0, vocab=80)
    with pytest.raises(InputError, match="vocab_size"):
        average_experts([experts[0], other], tmp_path / "x")
    with pytest.raises(InputError, match="does not exist"):
        average_experts([experts[0], tmp_path / "nope"], tmp_path / "x")
    with pytest.raises(InputError):
        average_experts(experts, tmp_path / "x", weights=[1, -1, 1])
    with pytest.raises(InputError):
        average_experts(experts, tmp_path / "x", weights=[1, 1])
    assert not (tmp_path / "x").exists()

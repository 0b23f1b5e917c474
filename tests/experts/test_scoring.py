"""The scoring interface on a single tiny HF model: derived methods agree with the token-level ones."""
import torch

from experts.scoring import HFCausalLM, ScoringModel
from merge_helpers import random_text, tiny_llama, tiny_tokenizer


def _lm(seed=0):
    return HFCausalLM(tiny_llama(seed), tiny_tokenizer(), max_length=64)


class Recompute(ScoringModel):
    """The base class's generic (uncached) generation over an HFCausalLM's next_token_logprobs."""

    def __init__(self, lm):
        self.lm, self.tokenizer, self.max_length, self.device = lm, lm.tokenizer, lm.max_length, lm.device

    def token_logprobs(self, input_ids, attention_mask=None, prefix_texts=None):
        return self.lm.token_logprobs(input_ids, attention_mask)

    def next_token_logprobs(self, input_ids, attention_mask=None, prefix_texts=None):
        return self.lm.next_token_logprobs(input_ids, attention_mask)


def test_loglikelihood_matches_token_logprobs():
    lm = _lm()
    ctx, cont = "w1 w2 w3", "w4 w5"
    ids = torch.tensor([lm._encode(ctx) + lm._encode(cont)])
    want = float(lm.token_logprobs(ids)[0, -2:].sum())
    (got, _), = lm.loglikelihood([(ctx, cont)])
    assert abs(got - want) < 1e-4


def test_is_greedy_flag_matches_generation():
    lm = _lm()
    prompt = "w3 w9 w1"
    gen = lm.generate([prompt], max_new_tokens=3)[0]
    assert gen
    (_, greedy), (_, not_greedy) = lm.loglikelihood([(prompt, gen), (prompt, gen + " w0 w0 w0 w0")])
    assert greedy
    assert not not_greedy or gen.endswith("w0")


def test_kv_cached_generation_equals_recomputation():
    lm = _lm(1)
    prompts = [random_text(5, s) for s in range(2)]
    assert lm.generate(prompts, max_new_tokens=6) == Recompute(lm).generate(prompts, max_new_tokens=6)


def test_padding_does_not_change_scores():
    lm = _lm()
    texts = [random_text(30, 1), random_text(7, 2)]
    batched = lm.loglikelihood_rolling(texts, batch_size=2)
    alone = [lm.loglikelihood_rolling([t], batch_size=1)[0] for t in texts]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), rtol=1e-5, atol=1e-4)

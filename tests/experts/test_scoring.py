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


def _reference_logprobs(model, ids):  # (B, T-1) log p(x_t | x_<t) from the model's own full logits, in float64
    logits = model(input_ids=ids).logits.double()
    return torch.log_softmax(logits, -1)[:, :-1].gather(2, ids[:, 1:, None])[..., 0]


def test_chunked_output_layer_equals_full_logits(monkeypatch):
    import experts.scoring as scoring

    lm = _lm(2)
    assert lm.split is not None  # llama: the output layer runs on chunks of decoder states
    monkeypatch.setattr(scoring, "LOGIT_CHUNK_ELEMENTS", 7 * lm.model.config.vocab_size)  # 7 positions per chunk
    ids = torch.randint(4, lm.model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    ref = _reference_logprobs(lm.model, ids)
    full_at = torch.zeros(3, 11, dtype=torch.bool)
    full_at[0, 4] = full_at[2, 9] = True
    for split in (lm.split, None):  # chunked output layer; the model's own forward (other architectures)
        lm.split = split
        lp, full = lm.score_tokens(ids, torch.ones_like(ids), full_at=full_at)
        torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)
        want = torch.log_softmax(lm.model(input_ids=ids).logits.double(), -1)[:, :-1][full_at]
        torch.testing.assert_close(full.double(), want, rtol=1e-5, atol=1e-5)
        lp, _ = lm.score_tokens(ids, score_from=torch.tensor([9, 6, 8]))  # output layer from target 6 on
        torch.testing.assert_close(lp[:, 5:].double(), ref[:, 5:], rtol=1e-5, atol=1e-5)

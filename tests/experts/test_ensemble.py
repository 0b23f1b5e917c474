"""c-BTM sparse ensemble and BTM posterior ensemble: invariants on tiny in-code experts."""
import math

import numpy as np
import pytest
import torch

from clustering.router import CentroidRouter
from corpus.io import InputError
from experts.ensemble import PosteriorEnsemble, RoutingSchedule, SparseEnsemble, expert_calls, posterior_weights
from experts.ensemble_folder import load_ensemble, save_ensemble_config
from experts.scoring import HFCausalLM
from merge_helpers import HashEmbedder, random_text, save_llama, tiny_llama, tiny_tokenizer

D = 8
TEXTS = [random_text(n, s) for s, n in enumerate([30, 17, 9, 24])]


@pytest.fixture(scope="module")
def experts():
    tok = tiny_tokenizer()
    return [HFCausalLM(tiny_llama(s), tok, max_length=64) for s in range(4)]


@pytest.fixture(scope="module")
def centroids():
    c = np.random.default_rng(1).standard_normal((4, D)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def _batch(tok, texts=TEXTS):
    rows = [[tok.bos_token_id] + tok(t)["input_ids"] for t in texts]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


def _ens(experts, centroids, **kw):
    kw = {"top_k": 2, "temperature": 0.5, "route_every": 4, **kw}
    return SparseEnsemble(experts, centroids, HashEmbedder(D), **kw)


# every routing option: the weights, the early refresh schedule, a prior
ROUTING = {
    "posterior": {"route_weights": "posterior"},
    "distance": {"route_weights": "distance"},
    "posterior+early": {"route_weights": "posterior", "route_early": (1, 2)},
    "distance+early": {"route_weights": "distance", "route_early": (1, 2)},
    "posterior+prior": {"route_weights": "posterior", "prior": (0.1, 0.2, 0.3, 0.4)},
}


@pytest.mark.parametrize("option", ROUTING)
def test_one_expert_ensemble_equals_expert(experts, centroids, option):
    kw = {**ROUTING[option]}
    if "prior" in kw:
        kw["prior"] = kw["prior"][:1]
    ens = _ens(experts[:1], centroids[:1], top_k=1, **kw)
    ids, mask = _batch(ens.tokenizer)
    valid = mask[:, 1:].bool()
    torch.testing.assert_close(ens.token_logprobs(ids, mask)[valid], experts[0].token_logprobs(ids, mask)[valid])
    reqs = [("w1 w2 w3", "w4 w5"), ("w9", "w7 w7")]
    got, want = ens.loglikelihood(reqs), experts[0].loglikelihood(reqs)
    assert [g for _, g in got] == [g for _, g in want]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], abs=1e-5)
    assert ens.generate(["w3 w1 w4"], max_new_tokens=6) == experts[0].generate(["w3 w1 w4"], max_new_tokens=6)


def test_permuting_clusters_with_experts_changes_nothing(experts, centroids):
    ids, mask = _batch(experts[0].tokenizer)
    a = _ens(experts, centroids).token_logprobs(ids, mask)
    perm = [2, 0, 3, 1]
    b = _ens([experts[p] for p in perm], centroids[perm]).token_logprobs(ids, mask)
    valid = mask[:, 1:].bool()
    torch.testing.assert_close(a[valid], b[valid])


def test_weights_nonnegative_sum_to_one_zero_outside_top_k(centroids):
    emb = HashEmbedder(D).transform(TEXTS)
    w = CentroidRouter(None, centroids, top_k=2, temperature=0.3).weights(emb)
    assert (w >= 0).all() and torch.allclose(w.sum(1), torch.ones(len(TEXTS)))
    assert ((w > 0).sum(1) <= 2).all()
    d2 = ((emb[:, None, :] - centroids[None]) ** 2).sum(-1)
    nearest = np.argsort(d2, 1)[:, :2]
    for i in range(len(TEXTS)):
        assert set(torch.nonzero(w[i]).flatten().tolist()) <= set(nearest[i].tolist())


@pytest.mark.parametrize("route_weights", ["distance", "posterior"])
def test_ensemble_nll_at_most_weighted_expert_nll(experts, centroids, route_weights):
    ens = _ens(experts, centroids, route_every=1, route_weights=route_weights)
    ids, mask = _batch(ens.tokenizer)
    logw = ens.routing_plan(ids, mask)  # (B, T-1, k)
    mixed = ens.token_logprobs(ids, mask)
    per_expert = torch.stack([e.token_logprobs(ids, mask) for e in experts], -1)  # (B, T-1, k)
    valid = mask[:, 1:].bool()
    if route_weights == "posterior":
        logw = posterior_weights(logw, per_expert, valid)
    w = logw.exp()
    bound = -(w * per_expert).sum(-1)  # Σ w_i NLL_i (Jensen)
    assert (-mixed[valid] <= bound[valid] + 1e-5).all()
    assert torch.allclose(w.sum(-1)[valid], torch.ones(int(valid.sum())))


def test_top_all_with_huge_temperature_is_uniform_mixture(experts, centroids):
    ens = _ens(experts, centroids, top_k=4, temperature=1e9, route_weights="distance")
    ids, mask = _batch(ens.tokenizer)
    per_expert = torch.stack([e.token_logprobs(ids, mask) for e in experts], -1)
    uniform = torch.logsumexp(per_expert, -1) - math.log(4)
    valid = mask[:, 1:].bool()
    torch.testing.assert_close(ens.token_logprobs(ids, mask)[valid], uniform[valid])


def test_top_all_posterior_with_huge_temperature_is_btm_posterior(experts, centroids):
    """Uniform routing weights over all experts × the likelihood of the row = BTM's updating posterior."""
    ens = _ens(experts, centroids, top_k=4, temperature=1e9, route_weights="posterior")
    btm = PosteriorEnsemble(experts, prior="updating")
    ids, mask = _batch(ens.tokenizer)
    valid = mask[:, 1:].bool()
    torch.testing.assert_close(ens.token_logprobs(ids, mask)[valid], btm.token_logprobs(ids, mask)[valid],
                               rtol=1e-5, atol=1e-5)


def test_posterior_weights_follow_the_formula(experts, centroids):
    """log w'_j(t) = log_softmax_j(log w_j(t) + Σ_{1≤s<t} log p_j(x_s)) over the routed experts, top-2 of 4."""
    ens = _ens(experts, centroids, route_early=(1, 3), route_weights="posterior")
    ids, mask = _batch(ens.tokenizer)
    prefixes = ["", TEXTS[2], "", TEXTS[0]]
    logw = ens.routing_plan(ids, mask, prefixes)  # (B, T-1, k)
    per_expert = torch.stack([e.token_logprobs(ids, mask) for e in experts], -1).double()  # (B, T-1, k)
    got = ens.token_logprobs(ids, mask, prefixes)
    for i in range(len(ids)):
        L = int(mask[i].sum())
        for t in range(1, L):
            routed = torch.isfinite(logw[i, t - 1])
            score = logw[i, t - 1].double() + per_expert[i, : t - 1].sum(0)
            w = torch.softmax(score[routed], 0)
            want = torch.logsumexp(w.log() + per_expert[i, t - 1][routed], 0)
            assert abs(float(got[i, t - 1]) - float(want)) < 1e-4
    assert not torch.allclose(got, _ens(experts, centroids, route_early=(1, 3), route_weights="distance")
                              .token_logprobs(ids, mask, prefixes))


@pytest.mark.parametrize("option", ROUTING)
def test_routing_never_reads_predicted_tokens(experts, centroids, option):
    ens = _ens(experts, centroids, route_every=3, **ROUTING[option])
    tok = ens.tokenizer
    a_ids, _ = _batch(tok, [TEXTS[0]])
    la = ens.token_logprobs(a_ids)
    mix_a = ens.last_weights.clone()  # (1, T-1, k) the weights the mixture used, posterior term included
    for cut in (2, 3, 5, 13):
        b_ids = a_ids.clone()
        b_ids[0, cut:] = (b_ids[0, cut:] - 4 + 7) % 60 + 4  # change every token from position `cut` on
        wa, wb = ens.routing_plan(a_ids), ens.routing_plan(b_ids)
        lb = ens.token_logprobs(b_ids)
        mix_b = ens.last_weights
        # targets t < cut (outputs 0..cut-2) see only unchanged tokens; target t = cut is itself changed
        assert torch.equal(wa[:, : cut - 1], wb[:, : cut - 1])
        torch.testing.assert_close(la[:, : cut - 1], lb[:, : cut - 1])
        # the weights of target t = cut (output cut-1) may read x_<cut only, never x_cut
        assert torch.equal(wa[:, :cut], wb[:, :cut])
        torch.testing.assert_close(mix_a[:, :cut], mix_b[:, :cut], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mix_a[:, cut:], mix_b[:, cut:])  # later weights do change


@pytest.mark.parametrize("route_weights", ["distance", "posterior"])
def test_only_selected_experts_run(experts, centroids, route_weights):
    ens = _ens(experts, centroids, top_k=1, route_every=1000, route_weights=route_weights)
    ids, mask = _batch(ens.tokenizer)
    prefixes = TEXTS[::-1]  # document context before each row, so even the first chunk has a routing signal
    ens.reset_stats()
    ens.token_logprobs(ids, mask, prefixes)
    chosen = {int(i) for i in torch.isfinite(ens.routing_plan(ids, mask, prefixes)).nonzero()[:, 2]}
    assert set(ens.stats["expert_calls"]) == chosen
    assert all(n == 1 for n in ens.stats["expert_calls"].values())
    assert sum(ens.stats["rows"].values()) == len(TEXTS)  # top-1, one chunk: each row runs exactly once


@pytest.mark.parametrize("option", ROUTING)
def test_next_token_and_greedy_flags(experts, centroids, option):
    ens = _ens(experts, centroids, top_k=2, **ROUTING[option])
    gen = ens.generate(["w5 w6 w7"], max_new_tokens=4)[0]
    assert gen
    (_, greedy), = ens.loglikelihood([("w5 w6 w7", gen)])
    assert greedy
    ids, mask = _batch(ens.tokenizer, TEXTS[:2])
    nxt = ens.next_token_logprobs(ids, mask)
    torch.testing.assert_close(nxt.exp().sum(-1), torch.ones(2))


def test_posterior_one_expert_equals_expert(experts):
    ids, mask = _batch(experts[0].tokenizer)
    valid = mask[:, 1:].bool()
    for prior in ("updating", "cached"):
        ens = PosteriorEnsemble(experts[:1], prior=prior, prior_weights=[1.0] if prior == "cached" else None)
        torch.testing.assert_close(ens.token_logprobs(ids, mask)[valid], experts[0].token_logprobs(ids, mask)[valid])
        assert ens.generate(["w2 w2"], max_new_tokens=4) == experts[0].generate(["w2 w2"], max_new_tokens=4)


def test_posterior_updating_is_bayes_on_prefix(experts):
    ens = PosteriorEnsemble(experts[:3], prior="updating")
    ids, _ = _batch(experts[0].tokenizer, TEXTS[:1])
    per_expert = torch.stack([e.token_logprobs(ids) for e in experts[:3]], -1)[0]  # (T-1, 3)
    t = 10
    post = torch.softmax(per_expert[:t].sum(0), 0)  # uniform prior, prefix targets 1..t
    want = torch.log((post * per_expert[t].exp()).sum())
    torch.testing.assert_close(ens.token_logprobs(ids)[0, t], want)
    prior = ens.estimate_cached_prior(TEXTS)
    assert len(prior) == 3 and abs(sum(prior) - 1) < 1e-6 and min(prior) >= 0


def test_config_round_trip(tmp_path, centroids):
    dirs = [save_llama(tmp_path / f"e{s}", seed=s) for s in range(2)]
    np.save(tmp_path / "centroids.npy", centroids[:2])
    save_ensemble_config(tmp_path / "posterior", dirs, kind="posterior", prior="cached", prior_weights=[0.3, 0.7], top_k=1)
    ens = load_ensemble(tmp_path / "posterior")
    assert isinstance(ens, PosteriorEnsemble) and ens.prior_weights == pytest.approx([0.3, 0.7])
    ens.reset_stats()
    ens.loglikelihood_rolling(TEXTS[:1])
    assert set(ens.stats["expert_calls"]) == {1}  # lazily loaded, only the top-1 expert ran
    with pytest.raises(InputError, match="centroids"):
        save_ensemble_config(tmp_path / "sparse", dirs + dirs[:1], centroids_path=tmp_path / "centroids.npy",
                             embedder_dir=tmp_path)
    from clustering.embed import TfidfEmbedder

    emb = TfidfEmbedder(n_components=D).fit([random_text(20, s) for s in range(30)])
    emb.save(tmp_path / "embedder")
    np.save(tmp_path / "centroids.npy", emb.transform(TEXTS[:2]))
    path = save_ensemble_config(tmp_path / "sparse", dirs, centroids_path=tmp_path / "centroids.npy",
                                embedder_dir=tmp_path / "embedder", top_k=1, route_every=8, route_early=[4, 1, 2, 16],
                                route_weights="posterior", prior_weights=[1, 3])
    ens = load_ensemble(tmp_path / "sparse")
    assert isinstance(ens, SparseEnsemble) and ens.route_weights == "posterior" and ens.prior == [0.25, 0.75]
    assert ens.schedule.every == 8 and ens.schedule.early == (1, 2, 4) and ens.top_k == 1
    assert load_ensemble(tmp_path / "sparse", route_weights="distance").route_weights == "distance"  # override
    import json

    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("route_early", "route_weights",
                                                                           "prior_weights")}
    path.write_text(json.dumps(old))  # a config written before the routing options: the routing it was made for
    ens = load_ensemble(tmp_path / "sparse")
    assert ens.route_weights == "distance" and ens.schedule.early == () and ens.prior is None
    for bad, match in (({"route_early": [0]}, "route_early"), ({"route_weights": "x"}, "route_weights"),
                       ({"prior_weights": [1]}, "prior")):
        with pytest.raises(InputError, match=match):
            save_ensemble_config(tmp_path / "bad", dirs, centroids_path=tmp_path / "centroids.npy",
                                 embedder_dir=tmp_path / "embedder", **bad)


def test_bad_input(experts, centroids, tmp_path):
    with pytest.raises(InputError, match="temperature"):
        _ens(experts, centroids, temperature=0)
    with pytest.raises(InputError, match="top_k"):
        _ens(experts, centroids, top_k=5)
    with pytest.raises(InputError, match="centroids"):
        _ens(experts[:3], centroids)
    with pytest.raises(InputError, match="vocabular"):
        _ens([experts[0], HFCausalLM(tiny_llama(0, vocab=80), tiny_tokenizer())], centroids[:2])
    with pytest.raises(InputError, match="missing"):
        _ens([experts[0], tmp_path / "nope"], centroids[:2])
    with pytest.raises(InputError, match="top_k"):
        PosteriorEnsemble(experts[:2], top_k=3)
    with pytest.raises(InputError, match="cached"):
        PosteriorEnsemble(experts[:2], prior="cached").token_logprobs(torch.tensor([[0, 5, 6]]))


def test_expert_micro_batches_change_nothing(experts, centroids):
    ids, mask = _batch(experts[0].tokenizer)
    valid = mask[:, 1:].bool()
    a = _ens(experts, centroids).token_logprobs(ids, mask)
    b = _ens(experts, centroids, expert_batch_size=1).token_logprobs(ids, mask)
    torch.testing.assert_close(a[valid], b[valid], rtol=1e-5, atol=1e-5)


def test_fixed_routing_uses_one_weight_vector(experts, centroids):
    ens = _ens(experts, centroids, temperature=1.0)
    texts = TEXTS[:3]
    dense = ens.routing_weights(texts)  # (n, k)
    assert dense.shape == (3, len(experts))
    np.testing.assert_allclose(dense.sum(1), 1.0, rtol=1e-5)
    assert ((dense > 0).sum(1) <= 2).all()
    ens.set_fixed_routing(texts)
    fixed = ens.routing_weights([TEXTS[3], TEXTS[0]])
    np.testing.assert_allclose(fixed[0], fixed[1])
    assert (fixed[0] > 0).sum() <= 2 and abs(fixed[0].sum() - 1) < 1e-5
    ens.clear_fixed_routing()
    np.testing.assert_allclose(ens.routing_weights(texts), dense)


def test_empty_prefix_gets_uniform_mixture_of_all_experts(experts, centroids):
    ens = _ens(experts, centroids, top_k=1)
    dense = ens.routing_weights(["", TEXTS[0]])  # (2, k)
    np.testing.assert_allclose(dense[0], np.full(len(experts), 1 / len(experts)), rtol=1e-6)
    assert (dense[1] > 0).sum() == 1 and abs(dense[1].sum() - 1) < 1e-6
    # the first chunk of a row (empty prefix) mixes all experts; later chunks use only the top-1
    ids, mask = _batch(experts[0].tokenizer, TEXTS[:1])
    logw = ens.routing_plan(ids, mask)  # (1, T-1, k)
    assert torch.isfinite(logw[0, 0]).all()
    assert torch.isfinite(logw[0, ens.route_every]).sum() == 1


@pytest.mark.parametrize("early", [(), (1, 2, 4, 7)])
def test_routing_plan_matches_chunk_by_chunk_reference(experts, centroids, early):
    R = 3 if not early else 5
    ens = _ens(experts, centroids, top_k=2, route_every=R, route_early=early)
    ids, mask = _batch(ens.tokenizer)
    prefixes, starts = TEXTS[::-1], torch.tensor([1, 4, 2, 7])
    lengths = mask.sum(1)
    logw, need = ens._route(ids, lengths, prefixes, starts)  # (B, T-1, k), (B, k)
    want = torch.full_like(logw, -math.inf)
    for i in range(len(ids)):
        L, a = int(lengths[i]), int(starts[i])
        # routing after o tokens: o ∈ {0} ∪ {e ∈ early: e < R} ∪ {R, 2R, ...}; point a + o serves targets up to
        # the next point, routed on x_<(a + o)
        offsets = sorted({0, *[e for e in early if e < R], *range(R, L, R)})
        points = [a + o for o in offsets if a + o < L] + [L]
        for p, nxt in zip(points, points[1:]):
            text = prefixes[i] + ens.tokenizer.decode(ids[i, :p].tolist(), skip_special_tokens=True)
            w = torch.as_tensor(ens.routing_weights([text])[0])  # (k,)
            want[i, p - 1 : nxt - 1] = w.log()
    torch.testing.assert_close(logw, want)
    # need: input length each row must give each expert = its last routed target + 1
    target_len = torch.arange(2, ids.shape[1] + 1)[None, :, None]  # (1, T-1, 1)
    assert torch.equal(need, torch.where(torch.isfinite(logw), target_len, 0).amax(1))


def test_routing_schedule():
    s = RoutingSchedule(8, early=(1, 2, 4, 8, 20, 4))  # 8 and 20 are not before the first steady refresh
    assert s.early == (1, 2, 4)
    assert s.offsets(30) == [0, 1, 2, 4, 8, 16, 24] and s.offsets(3) == [0, 1, 2] and s.offsets(0) == []
    o = torch.arange(30)
    chunk = s.chunk_index(o)
    offsets = s.offsets(30)
    want = torch.tensor([max(c for c, start in enumerate(offsets) if start <= x) for x in range(30)])
    assert torch.equal(chunk, want)
    assert [s.last(n) for n in (0, 1, 3, 5, 8, 15, 17)] == [0, 1, 2, 4, 8, 8, 16]
    assert RoutingSchedule(4).offsets(9) == [0, 4, 8]


@pytest.mark.parametrize("kw, match", [
    ({"route_early": (1, 0, 4)}, "route_early"), ({"route_early": (-2,)}, "route_early"),
    ({"route_early": (1.5,)}, "route_early"), ({"route_every": 0}, "route_every"), ({"route_every": -16}, "route_every"),
    ({"route_weights": "likelihood"}, "route_weights"), ({"prior": (1, 2)}, "prior"),
    ({"prior": (1, -1, 1, 1)}, "prior"), ({"prior": (0, 0, 0, 0)}, "prior"), ({"prior": (1, float("nan"), 1, 1)}, "prior"),
])
def test_bad_routing_options(experts, centroids, kw, match):
    with pytest.raises(InputError, match=match) as err:
        _ens(experts, centroids, **kw)
    assert "\n" not in str(err.value)


def test_no_signal_prefix_gets_the_prior(experts, centroids):
    prior = [0.1, 0.2, 0.3, 0.4]
    for top_k in (1, 2, 4):
        ens = _ens(experts, centroids, top_k=top_k, prior=prior)
        dense = ens.routing_weights(["", TEXTS[0]])  # (2, k)
        np.testing.assert_allclose(dense[0], prior, rtol=1e-6)
        assert (dense[1] > 0).sum() == top_k
    # with the posterior, the first target of a document is the prior mixture; later ones add the likelihood
    ens = _ens(experts, centroids, top_k=1, prior=prior, route_weights="posterior")
    ids, _ = _batch(ens.tokenizer, TEXTS[:1])
    per_expert = torch.stack([e.token_logprobs(ids) for e in experts], -1)[0]  # (T-1, k)
    got = ens.token_logprobs(ids)[0]
    p = torch.tensor(prior)
    torch.testing.assert_close(got[0], torch.logsumexp(p.log() + per_expert[0], 0))
    post = torch.softmax(p.log() + per_expert[:2].sum(0), 0)
    torch.testing.assert_close(got[2], torch.logsumexp(post.log() + per_expert[2], 0))


def test_next_token_matches_scored_distribution(experts, centroids):
    """next_token_logprobs after a row = the mixture score_tokens gives for the token that follows it."""
    for option in ("posterior", "distance+early"):
        ens = _ens(experts, centroids, top_k=2, **ROUTING[option])
        ids, _ = _batch(ens.tokenizer, TEXTS[:1])  # (1, T)
        n = 9
        full_at = torch.zeros(1, ids.shape[1] - 1, dtype=torch.bool)
        full_at[0, n - 1] = True  # the distribution that predicts x_n
        _, full = ens.score_tokens(ids, full_at=full_at)
        torch.testing.assert_close(ens.next_token_logprobs(ids[:, :n])[0], full[0], rtol=1e-5, atol=1e-5)


class NaNAtPadding(HFCausalLM):
    """An expert whose outputs at padded targets are NaN (they are undefined by the scoring interface)."""

    def score_tokens(self, input_ids, attention_mask=None, prefix_texts=None, score_from=None, full_at=None):
        lp, full = super().score_tokens(input_ids, attention_mask, prefix_texts, score_from, full_at)
        if attention_mask is not None:
            lp = lp.masked_fill(~attention_mask[:, 1:].bool(), float("nan"))
        return lp, full


@pytest.mark.parametrize("route_weights", ["distance", "posterior"])
def test_non_finite_expert_scores_are_an_error(experts, centroids, route_weights):
    ids, mask = _batch(experts[0].tokenizer)
    valid = mask[:, 1:].bool()
    tok = experts[0].tokenizer
    padded = NaNAtPadding(experts[0].model, tok, name="padded")
    ens = _ens([padded, experts[1]], centroids[:2], top_k=2, route_weights=route_weights)
    got = ens.token_logprobs(ids, mask)  # NaN only at padding: excluded
    assert torch.isfinite(got[valid]).all()
    broken = tiny_llama(5)
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))  # a diverged expert
    ens = _ens([experts[0], HFCausalLM(broken, tok, name="cluster_001")], centroids[:2], top_k=2,
               route_weights=route_weights)
    with pytest.raises(InputError, match="expert cluster_001 gave non-finite") as err:
        ens.token_logprobs(ids, mask)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="cluster_001"):
        ens.loglikelihood([("w1 w2", "w3")])
    with pytest.raises(InputError, match="cluster_001"):
        ens.generate(["w1 w2"], max_new_tokens=2)


def test_expert_calls_pack_rows_by_tokens():
    assert expert_calls([1024] * 41, 32, 1024) == [21, 20]  # as few calls as the cap allows, even sizes
    assert expert_calls([1024] * 32, 32, 1024) == [32]
    assert expert_calls([5] * 7, 7, 5) == [7]
    # rows that need the expert only for a short first chunk share one call, apart from the full-length ones
    assert expert_calls([1024] * 30 + [17] * 200, 32, 1024) == [30, 200]
    assert expert_calls([137, 102, 92, 89, 84] + [17] * 15, 16, 256) == [5, 15]
    needs = sorted(np.random.default_rng(0).integers(2, 300, 97).tolist(), reverse=True)
    sizes = expert_calls(needs, 8, 300)
    assert sum(sizes) == len(needs)
    start = 0
    for n in sizes:  # within the token cap; no row computed past twice its need
        assert n * needs[start] <= 8 * 300 and 2 * needs[start + n - 1] > needs[start]
        start += n


def test_posterior_updating_conditions_on_prefix_text(experts):
    ens = PosteriorEnsemble(experts[:3], prior="updating")
    prefix = random_text(90, 7)  # [BOS] + 90 tokens: two windows of the experts' max_length 64
    ids, _ = _batch(experts[0].tokenizer, TEXTS[1:2])
    per_expert = torch.stack([e.token_logprobs(ids) for e in experts[:3]], -1)[0]  # (T-1, 3)
    evidence = torch.tensor([e.loglikelihood_rolling([prefix])[0] for e in experts[:3]])  # (3,) log p_j(prefix)
    got = ens.token_logprobs(ids, prefix_texts=[prefix])[0]
    for t in (0, 6):  # output t predicts x_{t+1}; the posterior has seen the prefix and x_1..x_t
        post = torch.softmax(evidence.double() + per_expert[:t].double().sum(0), 0)
        want = torch.log((post * per_expert[t].double().exp()).sum())
        torch.testing.assert_close(got[t].double(), want, rtol=1e-5, atol=1e-5)
    nxt = ens.next_token_logprobs(ids, prefix_texts=[prefix])[0]  # after the whole row
    post = torch.log_softmax(evidence + per_expert.sum(0), 0)
    dists = torch.stack([e.next_token_logprobs(ids)[0] for e in experts[:3]])  # (3, V)
    torch.testing.assert_close(nxt, torch.logsumexp(post[:, None] + dists, 0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, ens.token_logprobs(ids)[0])  # the prefix moved the posterior
    torch.testing.assert_close(ens.token_logprobs(ids, prefix_texts=[""]), ens.token_logprobs(ids))
    torch.testing.assert_close(ens.token_logprobs(ids, prefix_texts=[prefix])[0], got)  # from cached windows
    cached = PosteriorEnsemble(experts[:3], prior="cached", prior_weights=[0.2, 0.5, 0.3], top_k=2)
    torch.testing.assert_close(cached.token_logprobs(ids, prefix_texts=[prefix]), cached.token_logprobs(ids))

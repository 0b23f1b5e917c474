"""Balanced k-means invariants: balance within tolerance, objective vs an unbalanced reference, determinism,
backend agreement, save/load, predict consistency, bad input."""
import numpy as np
import pytest
import torch

from clustering import (BalancedKMeans, RandomClusters, UnbalancedKMeans, faiss_has_gpu, load_clusterer,
                        size_bounds)
from corpus.io import InputError

faiss = pytest.importorskip("faiss")


def blobs(n_per=300, k=4, d=8, sep=10.0, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(k, d)) * sep
    return (np.repeat(mu, n_per, 0) + rng.normal(size=(k * n_per, d))).astype(np.float32)


def dense_blob_with_outliers(seed=0):
    rng = np.random.default_rng(seed)
    blob = rng.normal(size=(1800, 6)) * 0.1
    outliers = rng.normal(size=(40, 6)) * 30
    return np.concatenate([blob, outliers]).astype(np.float32)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("balance", [1.0, 1.1])
def test_balance_on_adversarial_data(backend, balance):
    x = dense_blob_with_outliers()
    km = BalancedKMeans(8, n_iter=6, balance=balance, backend=backend, device="cpu", verbose=False).fit(x)
    lo, hi = size_bounds(len(x), 8, balance)
    sizes = np.bincount(km.labels_, minlength=8)
    assert sizes.sum() == len(x) and sizes.min() >= lo and sizes.max() <= hi
    assert sizes.tolist() == km.sizes_
    if balance == 1.0:
        assert set(sizes.tolist()) <= {len(x) // 8, -(-len(x) // 8)}


def test_inertia_close_to_unbalanced_on_separated_data():
    x = blobs()
    bal = BalancedKMeans(4, n_iter=10, device="cpu", backend="torch", verbose=False).fit(x)
    ref = UnbalancedKMeans(4, n_iter=10, device="cpu", backend="torch", verbose=False).fit(x)
    assert bal.inertia_ <= 1.1 * ref.inertia_
    km = faiss.Kmeans(x.shape[1], 4, niter=20, seed=1, nredo=3)
    km.train(x)
    faiss_inertia = float(km.index.search(x, 1)[0].mean())
    assert bal.inertia_ <= 1.1 * faiss_inertia


def test_same_seed_same_result_and_backends_agree():
    x = blobs(n_per=200, k=5, sep=3.0, seed=2)
    a = BalancedKMeans(5, n_iter=5, seed=3, device="cpu", backend="torch", verbose=False).fit(x)
    b = BalancedKMeans(5, n_iter=5, seed=3, device="cpu", backend="torch", verbose=False).fit(x)
    f = BalancedKMeans(5, n_iter=5, seed=3, device="cpu", backend="faiss", verbose=False).fit(x)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert (a.labels_ == f.labels_).mean() > 0.99
    np.testing.assert_allclose(a.centroids, f.centroids, atol=1e-3)
    np.testing.assert_array_equal(a.predict(x), f.predict(x))


def test_save_load_round_trip_and_predict(tmp_path):
    x = blobs(n_per=100, k=3)
    km = BalancedKMeans(3, n_iter=5, balance=50.0, device="cpu", verbose=False).fit(x)
    km.save(tmp_path / "c")
    back = load_clusterer(tmp_path / "c", device="cpu")
    assert isinstance(back, BalancedKMeans) and back.balance == 50.0
    np.testing.assert_array_equal(back.centroids, km.centroids)
    np.testing.assert_array_equal(back.prices_, km.prices_)
    # slack balance: a training point is predicted into the cluster it was fitted into
    np.testing.assert_array_equal(back.predict(x), km.labels_)
    # torch and float16 input work too
    np.testing.assert_array_equal(back.predict(torch.from_numpy(x).half()), back.predict(x.astype(np.float16)))
    d = back.squared_distances(x)
    labels, dist = back.predict(x, return_distance=True)
    np.testing.assert_allclose(dist, d[np.arange(len(x)), labels], rtol=1e-5, atol=1e-4)


def test_assign_balanced_streams_within_tolerance():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(900, 5)), rng.normal(size=(100, 5)) + 6]).astype(np.float32)
    km = BalancedKMeans(4, n_iter=5, balance=1.0, device="cpu", verbose=False, batch_size=128).fit(x[:400])
    near = np.bincount(km.predict(x), minlength=4)
    labels = km.assign_balanced(x)
    sizes = np.bincount(labels, minlength=4)
    assert set(sizes.tolist()) <= {250} and near.max() / max(near.min(), 1) > 1.0


def test_baselines():
    x = blobs(n_per=100, k=3)
    r = RandomClusters(3, device="cpu", verbose=False).fit(x)
    assert r.centroids.shape == (3, x.shape[1]) and sum(r.sizes_) == len(x)
    assert len(np.unique(r.random_labels(50))) == 3
    u = UnbalancedKMeans(3, device="cpu", verbose=False).fit(x)
    assert sorted(u.sizes_) == [100, 100, 100]


def test_edge_cases_k1_duplicates_zero_vectors():
    x = np.zeros((50, 4), np.float32)
    km = BalancedKMeans(5, n_iter=3, balance=1.0, device="cpu", verbose=False).fit(x)  # all duplicates, all zero
    assert sorted(km.sizes_) == [10] * 5
    one = BalancedKMeans(1, n_iter=2, device="cpu", verbose=False).fit(blobs(n_per=10))
    assert one.sizes_ == [40] and (one.predict(blobs(n_per=10)) == 0).all()


def test_bad_input():
    x = blobs(n_per=10, k=2)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(InputError, match="NaN"):
        BalancedKMeans(2, device="cpu", verbose=False).fit(bad)
    bad[3, 1] = np.inf
    with pytest.raises(InputError, match="row 3"):
        BalancedKMeans(2, device="cpu", verbose=False).fit(bad)
    with pytest.raises(InputError, match="larger than the number"):
        BalancedKMeans(50, device="cpu", verbose=False).fit(x)
    km = BalancedKMeans(2, device="cpu", verbose=False).fit(x)
    with pytest.raises(InputError, match="dimension"):
        km.predict(np.zeros((3, 5), np.float32))
    with pytest.raises(InputError, match="balance"):
        BalancedKMeans(2, balance=0.5)
    with pytest.raises(InputError, match="backend"):
        BalancedKMeans(2, backend="sklearn")
    with pytest.raises(InputError, match="not fitted"):
        BalancedKMeans(2, device="cpu").predict(x)
    if not faiss_has_gpu() and torch.cuda.is_available():
        with pytest.raises(InputError, match="faiss-gpu|torch"):
            BalancedKMeans(2, backend="faiss", device="cuda")


def test_dual_steps_converge_and_capped_round_caps():
    """Dual steps on fixed distances reach near-balance (two overfull neighbours must not stall), and the capped
    round leaves every overfull cluster at exactly hi."""
    from clustering.balanced import capped_assign, dual_step
    from clustering.search import sqdist

    x = torch.from_numpy(dense_blob_with_outliers())
    c = x[torch.arange(0, 1840, 230)]  # 8 centroids, 7 in the blob
    d = sqdist(x, c)  # (1840, 8)
    lo, hi = (torch.full((8,), v) for v in size_bounds(len(x), 8, 1.1))
    prices = torch.zeros(8)
    for _ in range(60):
        _, counts, delta, feasible = dual_step(d, prices, lo, hi, 1e-6)
        if feasible:
            break
        prices = prices + 0.5 * delta
    assert counts.max() <= 1.1 * hi[0] and counts.min() >= 0.9 * lo[0]
    a = capped_assign(d, torch.zeros(8), hi)
    sizes = torch.bincount(a, minlength=8)
    near = torch.bincount(d.argmin(1), minlength=8)
    assert (sizes[near > hi] == hi[near > hi]).all() and sizes.sum() == len(x)


def test_cpu_selection_and_kth_match_the_sorting_path():
    """The CPU fast paths (numpy radix sort + partition per group) pick exactly what the CUDA path (two stable
    sorts + ranks) picks, ties included: each group keeps its quota of largest/smallest keys, earlier items first."""
    from clustering.select import _group_kth_sorted, _select_by_rank, group_kth, group_order, select_per_group

    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 6, (500,), generator=g).float()  # many ties
    keys[::37] = float("inf")
    groups = torch.randint(0, 7, (500,), generator=g)
    for descending in (False, True):
        ref = torch.argsort(keys, descending=descending, stable=True)
        ref = ref[torch.argsort(groups[ref], stable=True)]
        assert torch.equal(group_order(keys, groups, descending), ref)
    quota = torch.tensor([0, 1, 5, 30, 60, 200, 71])  # none, few, about all, more than the group holds
    for largest in (False, True):
        fast = select_per_group(keys, groups, quota, largest)
        assert torch.equal(fast, _select_by_rank(keys, groups, quota, largest))
        assert torch.equal(torch.bincount(groups[fast], minlength=7),
                           torch.minimum(quota, torch.bincount(groups, minlength=7)))
    values = torch.randn(500, generator=g)
    ids, kth = torch.tensor([1, 3, 6]), torch.tensor([1, 17, 1000])  # 1000 > group size: clamped to the largest
    np.testing.assert_array_equal(group_kth(values, groups, ids, kth, 7),
                                  _group_kth_sorted(values, groups, ids, kth, 7))
    assert group_kth(values, groups, ids, kth, 7)[2] == values[groups == 6].max()


def test_relaxed_prices_reach_the_widened_bounds_and_update_sums_rows():
    """On fixed distances (a dense blob holding 7 of 8 centroids), warm-started relaxed_prices calls bring every
    size within the bounds ±5% and keep it there; the sparse (CPU) centroid update equals the dense one-hot sum."""
    from clustering import Clusterer
    from clustering.balanced import relaxed_prices
    from clustering.search import sqdist

    x = torch.from_numpy(dense_blob_with_outliers())
    for c in (x[torch.arange(0, 1840, 230)], x[torch.randperm(1840, generator=torch.Generator().manual_seed(0))[:8]]):
        d = sqdist(x, c)  # (1840, 8)
        lo, hi = (torch.full((8,), v) for v in size_bounds(len(x), 8, 1.02))
        assert not ((d.argmin(1).bincount(minlength=8) >= lo) & (d.argmin(1).bincount(minlength=8) <= hi)).all()
        prices, damp = torch.zeros(8), torch.full((8,), 0.5)
        for _ in range(4):  # warm-started calls, as in the Lloyd loop
            prices, damp = relaxed_prices(d, prices, damp, lo, hi, 4, 1e-6)
            sizes = torch.bincount((d + prices).argmin(1), minlength=8)
            assert (sizes >= 0.95 * lo).all() and (sizes <= 1.05 * hi).all()
    a = (d + prices).argmin(1)
    new_c, counts = Clusterer._update(x, a, c)
    onehot = torch.nn.functional.one_hot(a, 8).double()  # (n, 8)
    ref = (onehot.T @ x.double()) / counts.clamp_min(1)[:, None]
    torch.testing.assert_close(new_c[counts > 0], ref[counts > 0].float(), rtol=1e-5, atol=1e-5)
    a[a == 0] = 1  # an empty cluster keeps its old centroid
    new_c, counts = Clusterer._update(x, a, c)
    assert counts[0] == 0 and torch.equal(new_c[0], c[0])


def test_nonfinite_rows_found_without_false_alarms():
    from clustering.inputs import first_nonfinite_row

    x = torch.ones(10, 4)
    x[2] = 3e38  # finite entries whose row sum overflows to inf
    assert first_nonfinite_row(x) is None
    x[7, 1] = float("nan")
    x[9, 0] = -float("inf")
    assert first_nonfinite_row(x) == 7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_paths_select_what_the_cpu_paths_select():
    from clustering.balanced import _gains
    from clustering.select import group_kth, row_kth, select_per_group

    g = torch.Generator().manual_seed(1)
    keys = torch.randint(0, 6, (5000,), generator=g).float()
    groups = torch.randint(0, 7, (5000,), generator=g)
    quota = torch.tensor([0, 3, 50, 700, 800, 5000, 711])
    for largest in (False, True):
        assert torch.equal(select_per_group(keys.cuda(), groups.cuda(), quota.cuda(), largest).cpu(),
                           select_per_group(keys, groups, quota, largest))
    values, ids, kth = torch.randn(5000, generator=g), torch.tensor([0, 2, 5]), torch.tensor([1, 40, 9999])
    assert torch.equal(group_kth(values.cuda(), groups.cuda(), ids.cuda(), kth.cuda(), 7).cpu(),
                       group_kth(values, groups, ids, kth, 7))
    cost = torch.rand(5000, 7, generator=g)
    v0, best = cost.min(1)
    donors, cols, f = best != 3, torch.tensor([3, 5]), torch.tensor([17, 400])
    assert torch.equal(row_kth(_gains(cost.cuda(), v0.cuda(), donors.cuda(), cols.cuda()), f.cuda()).cpu(),
                       row_kth(_gains(cost, v0, donors, cols), f))
    x = dense_blob_with_outliers()
    km = BalancedKMeans(8, n_iter=6, balance=1.02, backend="torch", device="cuda", verbose=False).fit(x)
    lo, hi = size_bounds(len(x), 8, 1.02)
    assert sum(km.sizes_) == len(x) and min(km.sizes_) >= lo and max(km.sizes_) <= hi


def _lengths(x, seed=5):
    """Document lengths that differ by cluster region (a skewed, heavy-tailed length distribution)."""
    rng = np.random.default_rng(seed)
    return np.round(np.exp(rng.normal(5, 1, len(x)) + (x[:, 0] > 0) * 1.0)) + 1


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_token_weighted_balance_within_tolerance(backend):
    from clustering import weighted_size_bounds

    x = dense_blob_with_outliers()
    w = _lengths(x)
    km = BalancedKMeans(8, n_iter=6, balance=1.1, backend=backend, device="cpu", verbose=False).fit(x, weights=w)
    lo, hi = weighted_size_bounds(w.sum(), w.max(), 8, 1.1)
    sizes = np.bincount(km.labels_, weights=w, minlength=8)
    assert sizes.min() >= lo and sizes.max() <= hi and abs(sizes.sum() - w.sum()) < 1e-6
    np.testing.assert_allclose(sizes, km.weighted_sizes_)
    plain = np.bincount(BalancedKMeans(8, n_iter=6, balance=1.1, backend=backend, device="cpu",
                                       verbose=False).fit(x).labels_, weights=w, minlength=8)
    assert plain.max() / plain.min() > 2 * sizes.max() / sizes.min()  # balancing docs does not balance tokens
    # the streaming capacity-aware assignment keeps the weighted bounds over the whole corpus too
    labels = km.assign_balanced(x, weights=w)
    streamed = np.bincount(labels, weights=w, minlength=8)
    assert streamed.min() >= lo and streamed.max() <= hi


def test_weighted_backends_agree_and_equal_weights_match_counts():
    x = blobs(n_per=200, k=5, sep=3.0, seed=2)
    w = _lengths(x)
    t = BalancedKMeans(5, n_iter=5, seed=3, device="cpu", backend="torch", verbose=False).fit(x, weights=w)
    f = BalancedKMeans(5, n_iter=5, seed=3, device="cpu", backend="faiss", verbose=False).fit(x, weights=w)
    assert (t.labels_ == f.labels_).mean() > 0.99
    np.testing.assert_allclose(t.centroids, f.centroids, atol=1e-2)
    # equal weights: the same clustering problem as counting points
    x = dense_blob_with_outliers()
    eq = BalancedKMeans(8, n_iter=6, balance=1.1, device="cpu", backend="torch", verbose=False).fit(x, weights=np.full(len(x), 3.0))
    unit = BalancedKMeans(8, n_iter=6, balance=1.1, device="cpu", backend="torch", verbose=False).fit(x)
    assert sorted(eq.sizes_) == sorted(unit.sizes_) and (eq.labels_ == unit.labels_).mean() > 0.9
    assert eq.inertia_ <= 1.05 * unit.inertia_


def test_weighted_save_load_and_bad_weights(tmp_path):
    x = blobs(n_per=50, k=3)
    w = _lengths(x)
    km = BalancedKMeans(3, n_iter=3, device="cpu", verbose=False).fit(x, weights=w)
    km.save(tmp_path / "c")
    back = load_clusterer(tmp_path / "c", device="cpu")
    assert back.weighted and back.weighted_sizes_ == km.weighted_sizes_
    with pytest.raises(InputError, match="weights must be finite and > 0"):
        BalancedKMeans(3, device="cpu", verbose=False).fit(x, weights=np.zeros(len(x)))
    with pytest.raises(InputError, match="weights has 3 entries"):
        BalancedKMeans(3, device="cpu", verbose=False).fit(x, weights=np.ones(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_inputs_reach_the_gpu_as_the_tensor_does(tmp_path, monkeypatch):
    """numpy arrays and memmaps (float32 and float16) go to the GPU through pinned chunks (several, here) and fit
    exactly as the same matrix given as a CUDA tensor; a NaN is reported with its row."""
    import clustering.inputs as inputs

    monkeypatch.setattr(inputs, "_STAGE_BYTES", 4 * 6 * 300)  # 300 rows per chunk: 7 chunks through 2 buffers
    x = dense_blob_with_outliers()
    np.save(tmp_path / "x.npy", x)
    dev = torch.device("cuda")
    ref = BalancedKMeans(8, n_iter=6, backend="torch", device="cuda", verbose=False).fit(torch.from_numpy(x).to(dev))
    for inp in (x, np.load(tmp_path / "x.npy", mmap_mode="r"), x.astype(np.float16)):
        idx = np.sort(np.random.default_rng(0).choice(len(x), 999, replace=False))
        want = torch.from_numpy(np.asarray(inp, dtype=np.float32))
        assert torch.equal(inputs.take_rows(inp, idx, dev).cpu(), want[idx])
        assert torch.equal(inputs.rows_to_device(inp, 17, 1500, dev).cpu(), want[17:1500])
        if inp.dtype == np.float32:
            fit = BalancedKMeans(8, n_iter=6, backend="torch", device="cuda", verbose=False).fit(inp)
            np.testing.assert_array_equal(fit.centroids, ref.centroids)
    bad = x.copy()
    bad[1234, 2] = np.nan
    with pytest.raises(InputError, match="row 1234"):
        BalancedKMeans(8, n_iter=2, backend="torch", device="cuda", verbose=False).fit(bad)

"""The routing formula: softmax(−d²/T) over the top_k nearest centroids, nearest-centroid assignment, checks."""
import numpy as np
import pytest
import torch

from clustering.router import CentroidRouter
from corpus.io import InputError


def test_branch_weights_softmax_of_negative_squared_distance():
    """BTM branching weighs the experts by their centroids' distances d_j to the new centroid (here 0, 1, 2)."""
    w = CentroidRouter(None, np.array([[0.0], [1.0], [2.0]]), temperature=1.0).weights(np.zeros((1, 1)))[0]
    e = np.exp([0.0, -1.0, -4.0])
    np.testing.assert_allclose(w, e / e.sum())
    w = CentroidRouter(None, np.array([[1.0], [-1.0]]), temperature=0.5).weights(np.zeros((1, 1)))[0]
    np.testing.assert_allclose(w, [0.5, 0.5])


def test_route_weights_and_assign_agree_with_the_distances():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(20, 5, generator=g), torch.randn(6, 5, generator=g)
    router = CentroidRouter(None, c.numpy(), temperature=0.7, top_k=3)
    d2 = ((x.double()[:, None, :] - c.double()[None]) ** 2).sum(-1)  # (20, 6)
    torch.testing.assert_close(router.distances(x.numpy()), d2)
    assert torch.equal(router.assign(x.numpy()), d2.argmin(1))
    idx, w = router.route(x.numpy())
    assert torch.equal(idx, d2.argsort(1)[:, :3])
    torch.testing.assert_close(w, torch.softmax(-d2.gather(1, idx) / 0.7, 1).float())
    dense = router.weights(x.numpy())
    assert torch.equal(dense.gather(1, idx), w) and (dense > 0).sum(1).le(3).all()
    assert torch.equal(router.ranking(x.numpy()), d2.argsort(1))


def test_bad_temperature_top_k_and_dimension_refused():
    c = np.zeros((3, 2), np.float32)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError, match="temperature"):
            CentroidRouter(None, c, temperature=bad)
    for bad in (0, 4):
        with pytest.raises(InputError, match="top_k"):
            CentroidRouter(None, c, top_k=bad)

    class Embed3:
        def transform(self, texts):
            return np.ones((len(texts), 3), np.float32)

    with pytest.raises(InputError, match="dimension 2"):
        CentroidRouter(Embed3(), c).embed(["a"])

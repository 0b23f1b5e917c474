"""A tiny run folder built in code (3 experts, TF-IDF router, c-BTM and BTM ensemble folders), for the tests of
the Hugging Face ensemble model and the lm-evaluation-harness model."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.experts.merge_helpers import random_text, save_llama

N_EXPERTS = 3


def build_tiny_run(root: Path, top_k: int = 2, route_every: int = 4) -> Path:
    """`root/` with experts-x/cluster_00{0,1,2}, embeddings-x/embedder, clusters-x/centroids.npy and the HF ensemble
    folders merged-x/ensemble (c-BTM, top_k, route_every) and merged-x/posterior (BTM, updating prior). Returns root."""
    from clustering.embed import TfidfEmbedder
    from experts.ensemble_folder import save_ensemble_config
    from experts.hf_ensemble import write_hf_ensemble

    experts = [save_llama(root / "experts-x" / f"cluster_{j:03d}", seed=j) for j in range(N_EXPERTS)]
    texts = [random_text(20, s) for s in range(30)]
    embedder = TfidfEmbedder(n_components=6).fit(texts)
    embedder.save(root / "embeddings-x" / "embedder")
    emb = embedder.transform(texts)  # (30, d)
    centroids = np.stack([emb[j::N_EXPERTS].mean(0) for j in range(N_EXPERTS)]).astype(np.float32)  # (3, d)
    (root / "clusters-x").mkdir(parents=True)
    np.save(root / "clusters-x" / "centroids.npy", centroids)
    ens = root / "merged-x" / "ensemble"
    save_ensemble_config(ens, experts, kind="sparse", centroids_path=root / "clusters-x" / "centroids.npy",
                         embedder_dir=root / "embeddings-x" / "embedder", top_k=top_k, temperature=0.5,
                         route_every=route_every, name="ensemble")
    write_hf_ensemble(ens)
    post = root / "merged-x" / "posterior"
    save_ensemble_config(post, experts, kind="posterior", prior="updating", top_k=2, name="posterior")
    write_hf_ensemble(post)
    return root

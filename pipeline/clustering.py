"""Clustering stages: embed every document, fit (balanced) k-means, assign clusters, describe them."""
from __future__ import annotations

from pathlib import Path

from corpus.io import InputError, read_json
from pipeline.params import AssignParams, ClusterParams, EmbeddingParams, carries
from pipeline.stage import Stage
from pipeline.corpus import PrepareCorpus


@carries(PrepareCorpus)
class EmbedCorpus(Stage, EmbeddingParams):
    """`clustering.embed.embed_corpus` → `embeddings-<h>/{embedder/, train,valid,test.npy}` (L2-normalised)."""

    folder = "embeddings"
    hashed = ("embedder", "encoder_model", "embed_sample", "seed")

    @property
    def gpu_stage(self) -> bool:
        return self.embedder == "encoder" and self.device != "cpu"

    def requires(self):
        return self.clone(PrepareCorpus)

    def build(self, out: Path) -> dict:
        from clustering.embed import embed_corpus

        kw = {"model": self.encoder_model} if self.embedder == "encoder" and self.encoder_model else {}
        info = embed_corpus(self.input_path(self.requires()), out, embedder=self.embedder,
                            fit_sample=self.embed_sample, seed=self.seed, device=self.device,
                            workers=self.data_workers_value, **kw)
        return info if isinstance(info, dict) else None


@carries(PrepareCorpus, EmbedCorpus)
class FitClusters(Stage, ClusterParams):
    """`clustering.io.fit_clusters` → `clusters-<h>/{centroids.npy, config.json}`."""

    folder = "clusters"

    @property
    def hashed(self) -> tuple[str, ...]:  # the balance only weighs documents for the balanced clusterer
        base = ("num_clusters", "clusterer", "cluster_sample", "seed")
        return base + ("balance_by",) if self.clusterer == "balanced" and self.balance_by != "docs" else base

    def requires(self):
        return {"corpus": self.clone(PrepareCorpus), "embeddings": self.clone(EmbedCorpus)}

    def build(self, out: Path) -> dict:
        from clustering.io import fit_clusters

        corpus_dir = self.input_path(self.requires()["corpus"])
        n_train = read_json(corpus_dir / "stats.json")["n_docs"]["train"]
        if self.num_clusters > n_train:
            raise InputError(f"--num-clusters {self.num_clusters} is larger than the number of training documents "
                             f"({n_train} in {corpus_dir / 'train.parquet'})")
        return fit_clusters(self.input_path(self.requires()["embeddings"]), out, self.num_clusters,
                            clusterer=self.clusterer, fit_sample=self.cluster_sample, seed=self.seed,
                            device=self.device, balance_by=self.balance_by, corpus_dir=corpus_dir)


@carries(PrepareCorpus, EmbedCorpus, FitClusters)
class AssignClusters(Stage, AssignParams):
    """`clustering.io.assign_clusters` → `assignments-<h>/{split}.parquet` (id, cluster_id, distance) etc."""

    folder = "assignments"
    hashed = ("assign",)

    def requires(self):
        return {"corpus": self.clone(PrepareCorpus), "embeddings": self.clone(EmbedCorpus),
                "clusters": self.clone(FitClusters)}

    def build(self, out: Path) -> dict:
        from clustering.io import assign_clusters

        r = self.requires()
        return assign_clusters(self.input_path(r["embeddings"]), self.input_path(r["clusters"]), out,
                               self.input_path(r["corpus"]), assign=self.assign, device=self.device)


@carries(PrepareCorpus, EmbedCorpus, FitClusters, AssignClusters)
class DescribeClusters(Stage):
    """`clustering.inspect.describe_clusters` → `cluster-info-<h>/` (sizes, top terms, NMI/purity, PNG plots)."""

    folder = "cluster-info"

    def requires(self):
        return {"corpus": self.clone(PrepareCorpus), "embeddings": self.clone(EmbedCorpus),
                "clusters": self.clone(FitClusters), "assignments": self.clone(AssignClusters)}

    def build(self, out: Path) -> dict:
        from clustering.inspect import describe_clusters

        r = {k: self.input_path(t) for k, t in self.requires().items()}
        return describe_clusters(r["corpus"], r["embeddings"], r["assignments"], r["clusters"], out)

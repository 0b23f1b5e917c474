"""Training stages: tokenizer, packed shards, the seed (BTM's seed phase), one expert per cluster, the dense
baseline. Budgets follow `experts.train.compute_budget` (compute matching: seed + k experts == seed + dense)."""
from __future__ import annotations

import shutil
from pathlib import Path

import luigi

from corpus.io import InputError, read_json, write_json
from pipeline.base import RunParams, Stage, gpu_slots
from pipeline.clustering import AssignClusters, FitClusters
from pipeline.corpus import PrepareCorpus


class TrainTokenizer(Stage):
    """`experts.tokenizer.train_tokenizer` (byte-level BPE on the train split) for `--seed-model scratch`; for an
    HF seed its own tokenizer is copied → `tokenizer-<h>/`."""

    folder = "tokenizer"
    hashed = ("seed_model", "vocab_size")

    def requires(self):
        return self.clone(PrepareCorpus)

    def build(self, out: Path) -> dict:
        if self.seed_model != "scratch":
            from experts.tokenizer import load_tokenizer

            load_tokenizer(self.seed_model).save_pretrained(out)
            return {"from": self.seed_model}
        import pyarrow.parquet as pq

        from experts.tokenizer import train_tokenizer

        path = self.input_path(self.requires()) / "train.parquet"
        texts = (t for batch in pq.ParquetFile(path).iter_batches(columns=["text"], batch_size=1024)
                 for t in batch.column(0).to_pylist())
        tok = train_tokenizer(texts, out, vocab_size=self.vocab_size)
        return {"vocab_size": len(tok)}


class ShardCorpus(Stage):
    """`experts.data.shard_corpus` → `shards-<h>/cluster_{id:03d}.npy`, `valid_cluster_{id:03d}.npy`, meta.json."""

    folder = "shards"
    hashed = ("seq_len", "model_size", "seed_model")

    def requires(self):
        return {"corpus": self.clone(PrepareCorpus), "assignments": self.clone(AssignClusters),
                "tokenizer": self.clone(TrainTokenizer)}

    def resolved_seq_len(self) -> int:
        if self.seq_len:
            return self.seq_len
        if self.seed_model == "scratch":
            from experts.model import get_preset

            return get_preset(self.model_size).seq_len
        from transformers import AutoConfig

        return int(min(getattr(AutoConfig.from_pretrained(self.seed_model), "max_position_embeddings", 1024), 1024))

    def build(self, out: Path) -> dict:
        from experts.data import shard_corpus

        r = {k: self.input_path(t) for k, t in self.requires().items()}
        return shard_corpus(r["corpus"], r["assignments"], r["tokenizer"], out, self.resolved_seq_len())


class _TrainStage(Stage):
    """Shared wiring of the stages that call `experts.launch.launch_training`."""

    resumable = True
    gpu_stage = True

    def shards(self) -> Path:
        return self.clone(ShardCorpus).out_path()

    def _hash_value(self, name: str):
        if name == "batch_tokens" and not self.batch_tokens:
            # one micro-batch per GPU is then the global batch; the default 8 keeps the hashes runs already have
            return f"{self.micro_batch_size} blocks per GPU" if self.micro_batch_size != 8 else 0
        return super()._hash_value(name)

    @staticmethod
    def summary(info, keys=("tokens_seen", "steps", "wall_time_s", "gpu_hours", "final_loss")) -> dict:
        """The stage.json `result`: the headline fields of the training result."""
        return {k: info.get(k) for k in keys} if isinstance(info, dict) else {}

    def shard_paths(self, cluster_ids=None, split: str = "train") -> list[str]:
        from experts.data import shard_name

        meta = read_json(self.shards() / "meta.json")
        ids = sorted(int(c) for c in meta["clusters"]) if cluster_ids is None else list(cluster_ids)
        return [str(self.shards() / shard_name(c, split)) for c in ids
                if meta["clusters"].get(str(c), {}).get(split, {}).get("n_blocks", 0) > 0]

    def budget(self) -> dict:
        from experts.train import compute_budget

        return compute_budget(self.train_tokens, self.seed_fraction, self.num_clusters)

    def train_config(self, tokens: int, **kw):
        from experts.train import TrainConfig

        opts = dict(train_tokens=tokens, seed=self.seed, device=self.device, sharding=self.sharding,
                    global_batch_tokens=self.batch_tokens or None, micro_batch_size=self.micro_batch_size,
                    compile={"auto": None, "on": True, "off": False}[self.compile])
        opts.update(kw)
        if self.learning_rate:
            opts["lr"] = self.learning_rate
            opts["min_lr"] = self.learning_rate / 10
        return TrainConfig(**opts)

    def launch(self, init, out: Path, tokens: int, cluster_ids=None, tokenizer=None) -> dict:
        """Train `init` on the clusters' shards for `tokens` tokens on this stage's GPUs (none on CPU)."""
        from experts.launch import launch_training

        with gpu_slots(self.gpu_count() if self.device != "cpu" else 0, Path(self.run_dir) / ".gpu-locks") as gpus:
            return launch_training(init, self.shard_paths(cluster_ids), out, self.train_config(tokens),
                                   valid_paths=self.shard_paths(cluster_ids, "valid") or None,
                                   tokenizer=tokenizer, gpus=gpus or None)


class TrainSeed(_TrainStage):
    """BTM's seed phase: `seed_fraction × train_tokens` on all clusters, from a scratch Llama preset or from an HF
    causal LM → `seed-<h>/` (save_pretrained + training.json)."""

    folder = "seed"
    hashed = ("seed_model", "model_size", "train_tokens", "seed_fraction", "batch_tokens", "learning_rate", "seed")

    def requires(self):
        return {"shards": self.clone(ShardCorpus), "tokenizer": self.clone(TrainTokenizer)}

    def build(self, out: Path) -> dict:
        from experts.model import build_scratch_model, load_causal_lm
        from experts.tokenizer import load_tokenizer

        tokenizer_dir = self.input_path(self.requires()["tokenizer"])
        meta = read_json(self.shards() / "meta.json")
        tokens = self.budget()["seed_tokens"]
        if self.seed_model == "scratch":
            init = build_scratch_model(self.model_size, vocab_size=meta["vocab_size"], seq_len=meta["seq_len"],
                                       seed=self.seed)
        else:
            init = self.seed_model
        if tokens > 0:
            return self.launch(init, out, tokens, tokenizer=str(tokenizer_dir))
        # --seed-fraction 0: the seed is the initial model itself (no seed phase)
        model = init if self.seed_model == "scratch" else load_causal_lm(init, load_tokenizer=False)[0]
        model.save_pretrained(out)
        load_tokenizer(tokenizer_dir).save_pretrained(out)
        info = {"tokens_seen": 0, "steps": 0, "wall_time_s": 0.0, "gpu_hours": 0.0, "note": "no seed phase"}
        write_json(out / "training.json", info)
        return info


class TrainExpert(_TrainStage):
    """Branch from the seed (or, `--branch-from average`, from the centroid-distance-weighted average of the
    first half of the experts, BTM's way to add a domain) and train on cluster `cluster_id`'s shard for
    `(1 − seed_fraction) × train_tokens / k` tokens → `experts-<h>/cluster_{id:03d}/`; with `--expert-trainable
    ffn` only the feed-forward blocks train (FlexOlmo)."""

    folder = "experts"
    cluster_id = luigi.IntParameter()

    @property
    def hashed(self) -> tuple[str, ...]:  # the temperature weights the average that later experts branch from
        h = ("branch_from", "temperature") if self.branch_from == "average" else ("branch_from",)
        return h + (("expert_trainable",) if self.expert_trainable != "all" else ())

    def train_config(self, tokens: int, **kw):
        return super().train_config(tokens, trainable=self.expert_trainable, **kw)

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.cluster_id < self.num_clusters:
            raise InputError(f"--cluster-id {self.cluster_id}: must be in [0, {self.num_clusters})")

    @property
    def subpath(self) -> str:
        return f"cluster_{self.cluster_id:03d}"

    def gpu_count(self) -> int:
        return self.gpus_per_expert

    def first_phase(self) -> list[int]:
        """Experts that branch from the seed when --branch-from average (the others average these)."""
        return list(range(max(1, self.num_clusters // 2)))

    def branches_from_average(self) -> bool:
        return self.branch_from == "average" and self.cluster_id not in self.first_phase()

    def requires(self):
        req = {"shards": self.clone(ShardCorpus), "seed": self.clone(TrainSeed), "clusters": self.clone(FitClusters)}
        if self.branches_from_average():
            req["experts"] = [self.clone(TrainExpert, cluster_id=j) for j in self.first_phase()]
        return req

    def hash_inputs(self):
        r = self.requires()
        return [r["shards"], r["seed"], r["clusters"]]  # the same for every cluster_id: one experts-<h>/ folder

    def build(self, out: Path) -> dict:
        r = self.requires()
        init = self.input_path(r["seed"])
        if self.branches_from_average():
            import numpy as np

            from experts.average import average_experts
            from experts.train import branch_weights

            centroids = np.load(self.input_path(r["clusters"]) / "centroids.npy")  # (k, dim)
            sources = self.first_phase()
            d2 = ((centroids[sources] - centroids[self.cluster_id]) ** 2).sum(-1)  # (n_sources,)
            weights = branch_weights(d2, temperature=self.temperature, squared=True)
            init = out.parent / f"{out.name}.branch-init"
            average_experts([self.input_path(t) for t in r["experts"]], init, weights=weights.tolist())
        info = self.launch(str(init), out, self.budget()["expert_tokens"], cluster_ids=[self.cluster_id])
        if init != self.input_path(r["seed"]):
            shutil.rmtree(init, ignore_errors=True)
        return self.summary(info)


class TrainDense(_TrainStage):
    """The compute-matched dense baseline: the same seed continued on all clusters for
    `(1 − seed_fraction) × train_tokens` tokens → `dense-<h>/`."""

    folder = "dense"

    def requires(self):
        return {"shards": self.clone(ShardCorpus), "seed": self.clone(TrainSeed)}

    def build(self, out: Path) -> dict:
        info = self.launch(str(self.input_path(self.requires()["seed"])), out, self.budget()["dense_tokens"])
        return self.summary(info)


class TrainExperts(RunParams, luigi.WrapperTask):
    """Every `TrainExpert(cluster_id)` of the run. On several hosts sharing the run folder, start
    `luigi --module pipeline TrainExperts --scheduler-host <luigid host> --workers N` on each: every worker picks
    up the next expert that nobody trains yet."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.validate()

    def requires(self):
        return [self.clone(TrainExpert, cluster_id=c) for c in range(self.num_clusters)]

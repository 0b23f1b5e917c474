"""The c-BTM pipeline as Luigi stages — thin wiring over `corpus/`, `clustering/`, `experts/`, `tasks/`.

Read in order, this is the table of contents (stage → library function → output folder under --run-dir):

    WriteDemoCorpus     corpus.demo.write_demo_corpus            demo-corpus-<h>/   (only for --corpus demo)
    PrepareCorpus       corpus.read.prepare_corpus               corpus-<h>/
    EmbedCorpus         clustering.embed.embed_corpus            embeddings-<h>/
    FitClusters         clustering.io.fit_clusters               clusters-<h>/
    AssignClusters      clustering.io.assign_clusters            assignments-<h>/
    DescribeClusters    clustering.inspect.describe_clusters     cluster-info-<h>/
    TrainTokenizer      experts.tokenizer.tokenizer_for_corpus   tokenizer-<h>/
    TokenizeCorpus      experts.data.tokenize_corpus             tokens-<h>/   (whole corpus: seed, dense)
    ShardCorpus         experts.data.shard_corpus                shards-<h>/   (per cluster: experts)
    TrainSeed           experts.launch.launch_training           seed-<h>/
    TrainExpert(c)      experts.launch.launch_training           experts-<h>/cluster_{c:03d}/
    TrainExperts        (wrapper: every TrainExpert)
    TrainDense          experts.launch.launch_training           dense-<h>/
    MergeExperts(m)     experts.merging.merge                    merged-<h>/<m>/ (m: ensemble, posterior, average,
                                                                   task_arithmetic, ties, dare_linear, dare_ties, moe)
    FinetuneMoE         experts.moe.finetune_moe                 moe-finetuned-<h>/
    TrainDenseMoECompute experts.launch.launch_training          moe-compute-dense-<h>/ (dense + the MoE's extra
                                                                   tokens: the MoE's equal-compute baseline)
    EvaluatePerplexity  tasks.perplexity.evaluate_perplexity     eval-<h>/perplexity/<model>.json
                        tasks.perplexity.oracle_perplexity       eval-<h>/perplexity/oracle.json (model oracle)
    MakeDomainTask      tasks.fewshot.build.make_task_from_corpus  task-domains-<h>/
    EvaluateFewShot     tasks.fewshot.evaluate.evaluate_fewshot  eval-<h>/fewshot/<task>/<model>.json
    Report              tasks.report.write_report                report-<h>/ (+ <run_dir>/report.{json,md})
    WriteModelCards     tasks.cards.write_run_cards            README.md in every model folder (+ cards-<h>/)
    RunAll              (wrapper: Report, WriteModelCards and everything upstream)
    Study               tasks.study.write_study                  study-<h>/ (+ <run_dir>/study.{json,md}): a grid of RunAlls

With --slurm-enabled, the stages that use GPUs run as Slurm jobs (pipeline/slurm.py); Luigi still schedules.
`python -m pipeline.gc <run_dir>` lists (and with --delete removes) the stage folders no recent RunAll uses.
"""
from pipeline.corpus import WriteDemoCorpus, PrepareCorpus
from pipeline.clustering import EmbedCorpus, FitClusters, AssignClusters, DescribeClusters
from pipeline.training import (TrainTokenizer, TokenizeCorpus, ShardCorpus, TrainSeed, TrainExpert, TrainExperts,
                               TrainDense)
from pipeline.merging import MergeExperts, FinetuneMoE, TrainDenseMoECompute
from pipeline.evaluation import EvaluatePerplexity, MakeDomainTask, EvaluateFewShot
from pipeline.report import Report, RunAll
from pipeline.study import Study
from pipeline.cards import WriteModelCards
from pipeline.slurm import slurm  # the [slurm] settings (--slurm-enabled ...): stages as Slurm jobs
from pipeline.cli import register

__all__ = [
    "WriteDemoCorpus", "PrepareCorpus", "EmbedCorpus", "FitClusters", "AssignClusters", "DescribeClusters",
    "TrainTokenizer", "TokenizeCorpus", "ShardCorpus", "TrainSeed", "TrainExpert", "TrainExperts", "TrainDense", "MergeExperts",
    "FinetuneMoE", "TrainDenseMoECompute", "EvaluatePerplexity", "MakeDomainTask", "EvaluateFewShot", "Report", "WriteModelCards", "RunAll", "Study",
]

register(__all__)  # what `luigi --module pipeline` needs from luigi: one-line errors, strict flags, defaults

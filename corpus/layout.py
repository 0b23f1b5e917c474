"""Names of the files in a run folder (`--run-dir`), in one place.

Each stage writes one folder `<run_dir>/<stage folder>-<hash>/` (pipeline/__init__.py lists them); these are the
files inside those folders that other stages, the report and the tests read back. `corpus/` is the shared
low-level package, so `clustering/`, `experts/` and `tasks/` can import it without importing `pipeline/`.
"""
RUN_MARKER = ".cbtm-run.json"  # the run folder itself: written when the pipeline first claims it (pipeline.preflight)
RUNS_LOG = "runs.jsonl"  # the run folder: one line per completed RunAll, the stage outputs it used (pipeline.gc)
STAGE_STAMP = "stage.json"  # every stage: its parameters and its inputs' run ids, written last
TRAIN_SPLIT = "train.parquet"  # corpus and assignments folders: the training split
CENTROIDS = "centroids.npy"  # clusters folder: (n_clusters, dim) float32
SHARDS_META = "meta.json"  # tokens and shards folders: seq_len and per-cluster token counts
TRAINING_INFO = "training.json"  # seed, dense and expert folders: budget, steps, losses
MERGE_INFO = "merge.json"  # merged/<method> folders of the parameter merges
MOE_INFO = "moe.json"  # merged/moe folder: how the BTX MoE was built
MERGE_FAILED = "failed.json"  # a merge folder whose method failed: the error and its fix, in place of the model
ENSEMBLE_CONFIG = "ensemble.json"  # merged/ensemble and merged/posterior folders: experts, centroids, routing
REPORT_JSON, REPORT_MD = "report.json", "report.md"  # report folder, published to <run_dir>/
STUDY_JSON, STUDY_MD = "study.json", "study.md"  # study folder, published to <run_dir>/

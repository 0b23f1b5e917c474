#!/usr/bin/env bash
# The c-BTM Study on corpus_dev on one GPU (docs/RESULTS.md): c-BTM against the compute-matched dense model over
# k, budgets, top-k, k-means vs random clusters and every merge method, with the pipeline's defaults for compute
# matching (steps), expert budgets (proportional) and routing.
#
#   bash bench/study_corpus_dev.sh smoke    # ~2 min: the same flags on a 3000-document sample, tiny budgets
#   bash bench/study_corpus_dev.sh study    # the Study of docs/RESULTS.md, ~8 min (resumes after a time limit)
#   bash bench/study_corpus_dev.sh full     # + the 24M budget and parameter merges (did not fit 30 device-minutes)
#   bash bench/study_corpus_dev.sh moe      # the BTX MoE of the main point (k=8, balanced, largest budget)
#   bash bench/study_corpus_dev.sh seed     # seed fraction 0.5 against 0.8 (k = 1, 8)
#   bash bench/study_corpus_dev.sh largek   # issue 22: k = 1,8,16,32 at the defaults (small clusters train one block per
#                                           # step for fewer steps), then the k = 8 BTX MoE against dense given its tokens
#   bash bench/study_corpus_dev.sh oneblock # issue 22: k = 16,32 with --small-share one_block (the other rule)
#   bash bench/study_corpus_dev.sh small    # issue 22: the next model size (--model-size small), k = 1, 8
#   bash bench/study_corpus_dev.sh pretrained  # a seed pretrained on other text (PRETRAIN_CORPUS, default
#                                           # .devdata/tasks_text: the few-shot tasks' texts), then c-BTM on
#                                           # corpus_dev branching from it (--seed-fraction 0, the c-BTM paper's way)
#
# CORPUS (default .devdata/corpus_dev: a copy of ../shared/data/corpus_dev), RUN (runs/study-dev), OUT (bench/out),
# TOKENS (largek and small: 24000000), DEVICE (cuda), EXTRA (more flags, e.g. a CPU dry run:
# DEVICE=cpu EXTRA="--max-docs 2000 --batch-tokens 8192 --eval-max-docs 20"),
# WORKERS (8: Luigi workers; experts share the GPU, --experts-per-gpu 8) may be overridden. On the GPU machine
# the GPU slots of evaluations come from [resources] gpu = WORKERS (they share the one GPU).
set -euo pipefail
CORPUS=${CORPUS:-.devdata/corpus_dev}
RUN=${RUN:-runs/study-dev}
OUT=${OUT:-bench/out}
WORKERS=${WORKERS:-8}
mkdir -p "$OUT"
cfg=$(mktemp /tmp/luigi-study-XXXX.cfg)
printf '[resources]\ngpu = %s\n' "$WORKERS" > "$cfg"
export LUIGI_CONFIG_PATH=$cfg
# the ~7M Llama of the issue (hidden 256, 4 layers, blocks of 512), its learning rate at a 65,536-token batch
model=(--model-size mini --vocab-size 16384 --learning-rate 1e-3 --batch-tokens 65536)
common=(--local-scheduler --corpus "$CORPUS" --label-field source --device "${DEVICE:-cuda}" --compile off --tasks none
        --experts-per-gpu "$WORKERS" --workers "$WORKERS" --eval-max-docs 400 --eval-batch-size 32)
TOKENS=${TOKENS:-24000000}
KS=${KS:-1,8,16,32}    # largek's k values and the k of its MoE (MOE_K)
MOE_K=${MOE_K:-8}
read -r -a extra <<< "${EXTRA:-}"
case "${1:-study}" in
  smoke)
    time luigi --module pipeline Study "${common[@]}" "${model[@]}" --run-dir "$RUN-smoke" --max-docs 3000 \
      --num-clusters 1,4 --train-tokens 2000000 --top-k 1,2,all --clusterer balanced --eval-max-docs 60 \
      --merge-methods "${MERGES:-ensemble,posterior,average,ties,moe}"
    cp "$RUN-smoke/study.md" "$OUT/study_smoke.md" ;;
  study)
    time luigi --module pipeline Study "${common[@]}" "${model[@]}" --run-dir "$RUN" --eval-max-docs 300 \
      --num-clusters 1,4,8 --train-tokens 80000000 --top-k 1,2,all --clusterer balanced,random \
      --merge-methods ensemble,posterior,average
    cp "$RUN/study.md" "$RUN/study.json" "$OUT/"
    # the smaller budget, k-means clusters only, in the same run folder (its tokenizer is shared)
    time luigi --module pipeline Study "${common[@]}" "${model[@]}" --run-dir "$RUN" --eval-max-docs 300 \
      --num-clusters 1,4,8 --train-tokens 24000000 --top-k 1,2,all --clusterer balanced \
      --merge-methods ensemble,posterior,average
    cp "$RUN/study.md" "$OUT/study_24m.md"; cp "$RUN/study.json" "$OUT/study_24m.json" ;;
  full)
    time luigi --module pipeline Study "${common[@]}" "${model[@]}" --run-dir "$RUN" \
      --num-clusters 1,4,8 --train-tokens 24000000,80000000 --top-k 1,2,all --clusterer balanced,random \
      --merge-methods ensemble,posterior,average,task_arithmetic,ties
    cp "$RUN/study.md" "$RUN/study.json" "$OUT/" ;;
  moe)
    time luigi --module pipeline RunAll "${common[@]}" "${model[@]}" --run-dir "$RUN" \
      --num-clusters 8 --train-tokens 80000000 --clusterer balanced \
      --merge-methods ensemble,posterior,average,task_arithmetic,ties,moe
    cp "$RUN/report.md" "$RUN/report.json" "$OUT/" ;;
  seed)
    time luigi --module pipeline Study "${common[@]}" "${model[@]}" --run-dir "$RUN" --eval-max-docs 300 \
      --num-clusters 1,8 --train-tokens 80000000 --seed-fraction 0.5,0.8 --top-k 1,2,all --clusterer balanced \
      --merge-methods ensemble,posterior
    cp "$RUN/study.md" "$RUN/study.json" "$OUT/" ;;
  largek)
    time luigi --module pipeline Study "${common[@]}" "${model[@]}" --run-dir "$RUN" --eval-max-docs 300 \
      --num-clusters "$KS" --train-tokens "$TOKENS" --top-k 1,2,all --clusterer balanced \
      --merge-methods ensemble,posterior "${extra[@]}"
    cp "$RUN/study.md" "$OUT/study_largek.md"; cp "$RUN/study.json" "$OUT/study_largek.json"
    # the k = 8 MoE and the dense model given its finetuning tokens (dense_moe_compute), same experts
    time luigi --module pipeline Study "${common[@]}" "${model[@]}" --run-dir "$RUN" --eval-max-docs 300 \
      --num-clusters "$MOE_K" --train-tokens "$TOKENS" --top-k 1,2,all --clusterer balanced \
      --merge-methods ensemble,posterior,moe "${extra[@]}"
    cp "$RUN/study.md" "$OUT/study_moe.md"; cp "$RUN/study.json" "$OUT/study_moe.json" ;;
  oneblock)  # the other small-share rule at the large k of largek (same seed, dense and clusters)
    time luigi --module pipeline Study "${common[@]}" "${model[@]}" --run-dir "$RUN" --eval-max-docs 300 \
      --num-clusters "${ONEBLOCK_KS:-16,32}" --train-tokens "$TOKENS" --top-k 1,2,all --clusterer balanced \
      --merge-methods ensemble,posterior --small-share one_block "${extra[@]}"
    cp "$RUN/study.md" "$OUT/study_oneblock.md"; cp "$RUN/study.json" "$OUT/study_oneblock.json" ;;
  small)
    time luigi --module pipeline Study "${common[@]}" --model-size small --vocab-size 16384 --learning-rate 1e-3 \
      --batch-tokens 65536 --run-dir "$RUN" --eval-max-docs 300 --num-clusters 1,8 --train-tokens "$TOKENS" \
      --top-k 1,2,all --clusterer balanced --merge-methods ensemble,posterior "${extra[@]}"
    cp "$RUN/study.md" "$OUT/study_small.md"; cp "$RUN/study.json" "$OUT/study_small.json" ;;
  pretrained)
    time luigi --module pipeline TrainDense "${common[@]}" "${model[@]}" --corpus "${PRETRAIN_CORPUS:-.devdata/tasks_text}" \
      --run-dir "$RUN-other" --train-tokens 12000000 --seed-fraction 0.5
    seed=$(ls -d "$RUN-other"/dense-*)
    time luigi --module pipeline Study "${common[@]}" "${model[@]}" --run-dir "$RUN-pretrained" --eval-max-docs 300 \
      --seed-model "$seed" --seed-fraction 0 --num-clusters 1,8 --train-tokens 24000000 --top-k 1,2,all \
      --clusterer balanced --merge-methods ensemble,posterior
    cp "$RUN-pretrained/study.md" "$OUT/study_pretrained.md"; cp "$RUN-pretrained/study.json" "$OUT/study_pretrained.json" ;;
  *) echo "usage: $0 smoke|study|full|moe|seed|largek|oneblock|small|pretrained" >&2; exit 2 ;;
esac

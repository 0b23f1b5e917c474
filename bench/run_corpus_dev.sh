#!/usr/bin/env bash
# A full c-BTM run on ../shared/data/corpus_dev on one GPU: 8 TF-IDF balanced clusters, `small` Llama experts
# (~36M params) trained from scratch, every merge method, perplexity, then 8-shot classification on the six
# tasks of ../shared/data/tasks for dense, c-BTM top-1/2/all, the averaged model and the BTX MoE.
#
#   bash bench/run_corpus_dev.sh perplexity   # everything but few-shot → $OUT/report_perplexity.{md,json}
#   bash bench/run_corpus_dev.sh fewshot      # adds the few-shot tasks   → $OUT/report_fewshot.{md,json}
#
# CORPUS, TASKS, RUN and OUT may be overridden (defaults: .devdata/corpus_dev, .devdata/tasks, runs/corpus_dev,
# bench/out). The second call reuses every stage of the first (same --run-dir), so it only adds few-shot work.
set -euo pipefail
CORPUS=${CORPUS:-.devdata/corpus_dev}
TASKS=${TASKS:-.devdata/tasks}
RUN=${RUN:-runs/corpus_dev}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
common=(--local-scheduler --run-dir "$RUN" --corpus "$CORPUS" --label-field source --num-clusters 8
        --model-size small --vocab-size 16384 --train-tokens 60000000 --batch-tokens 65536 --learning-rate 6e-4
        --device cuda --compile off --eval-max-docs 300 --route-every 64 --top-k 2 --temperature 0.1)
case "${1:-perplexity}" in
  perplexity)
    time luigi --module pipeline RunAll "${common[@]}" --tasks none
    cp "$RUN/report.md" "$OUT/report_perplexity.md"; cp "$RUN/report.json" "$OUT/report_perplexity.json" ;;
  fewshot)
    tasks=$(ls -d "$TASKS"/*/ | sed 's:/$::' | paste -sd, -)
    time luigi --module pipeline RunAll "${common[@]}" --tasks "$tasks" --shots 8 \
      --fewshot-seeds 13,21,42,87,100 --fewshot-max-test 100 \
      --fewshot-models dense,ensemble_top1,ensemble_top2,ensemble_topall,average,moe
    cp "$RUN/report.md" "$OUT/report_fewshot.md"; cp "$RUN/report.json" "$OUT/report_fewshot.json" ;;
  *) echo "usage: $0 perplexity|fewshot" >&2; exit 2 ;;
esac

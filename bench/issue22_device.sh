#!/usr/bin/env bash
# Issue 22's device call (docs/RESULTS.md "Large k"): on one GPU, in this order, each step's results copied to
# $OUT as soon as it ends: (1) `study_corpus_dev.sh largek` (k = 1,8,16,32 at the defaults, then the k = 8 MoE
# and dense_moe_compute), (2) when the k = 16/32 plans have experts below one block, the same k under
# --small-share one_block, (3) `study_corpus_dev.sh small` (--model-size small, k = 1, 8), each only if the
# deadline (DEADLINE seconds from the start, default 560) leaves room for it.
set -uo pipefail
START=$(date +%s)
DEADLINE=${DEADLINE:-560}
export OUT=${OUT:-bench/out} RUN=${RUN:-runs/study-dev} WORKERS=${WORKERS:-16}
mkdir -p "$OUT"
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
nvidia-cuda-mps-control -d 2>/dev/null && echo "CUDA MPS started"
timeout "$(left)" bash bench/study_corpus_dev.sh largek 2>&1 | grep -aE "small-share|Study|ERROR|Error|error:|real|→ .*(study|report)" | tail -n 40
python3 - "$RUN" > "$OUT/budgets.txt" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(f"{sys.argv[1]}/report-*/report.json")):
    r = json.load(open(f)); p = r["budgets"]["plan"]
    small = [e for e in p["experts"] if e.get("small")]
    print(f"k={p['n_clusters']} small={len(small)} steps={[e['steps'] for e in small]} "
          f"batches={sorted(e['batch_blocks'] for e in p['experts'])} rounding={p['rounding']} dense={p['dense']}")
PY
cat "$OUT/budgets.txt"
if grep -qE "k=(16|32) small=[1-9]" "$OUT/budgets.txt" && [ "$(left)" -gt 200 ]; then
  timeout "$(left)" bash bench/study_corpus_dev.sh oneblock 2>&1 | grep -aE "Study|ERROR|Error|real" | tail -n 10
fi
if [ "$(left)" -gt 150 ]; then
  RUN=$RUN-small timeout "$(left)" bash bench/study_corpus_dev.sh small 2>&1 | grep -aE "Study|ERROR|Error|real" | tail -n 10
fi
(cd "$OUT" && ls ./*.json >/dev/null 2>&1 && tar czf studies_json.tgz ./*.json && rm ./*.json)  # ≤ 8 files
echo "device call: $(( $(date +%s) - START )) s"

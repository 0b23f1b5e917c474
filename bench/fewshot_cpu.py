"""End-to-end check of tasks/ on CPU: a tiny random Llama through HFCausalLM on a few-shot task and on
corpus_dev perplexity; prints a markdown table.

Single-pass label scoring (all labels from one forward pass) is timed against per-label scoring (one row per
label) in the same run, and both must give the same accuracy.

    PYTHONPATH=. python bench/fewshot_cpu.py --task ../shared/data/tasks/ag_news --max-test 50
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="../shared/data/tasks/ag_news")
    ap.add_argument("--corpus", default="../shared/data/corpus_dev/valid.jsonl.gz")
    ap.add_argument("--max-test", type=int, default=50)
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--seeds", default="13,21,42,87,100")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--ppl-docs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from experts.model import build_scratch_model
    from experts.scoring import HFCausalLM
    from experts.tokenizer import train_tokenizer
    from tasks.fewshot import evaluate_fewshot, load_task
    from tasks.perplexity import evaluate_perplexity

    seeds = tuple(int(s) for s in args.seeds.split(","))
    task = load_task(args.task, max_test=args.max_test)
    with gzip.open(args.corpus, "rt") as f:
        docs = [json.loads(line) for _, line in zip(range(args.ppl_docs), f)]
    for d in docs:
        d["label"] = d.get("source")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tok = train_tokenizer([e["text"] for e in task.train] + [d["text"] for d in docs], Path(tmp) / "tok",
                              vocab_size=args.vocab_size)
        t_tok = time.perf_counter() - t0
    model = HFCausalLM(build_scratch_model("tiny", len(tok), seq_len=args.seq_len), tok, device="cpu",
                       name=f"tiny-random-{args.seq_len}")
    rows = []
    for single in (False, True):  # per-label first: it is the reference
        t0 = time.perf_counter()
        res = evaluate_fewshot(model, task, shots=args.shots, seeds=seeds, batch_size=args.batch_size,
                               single_pass=None if single else False)
        wall = time.perf_counter() - t0
        rows.append(("single-pass" if res["single_pass"] else "per-label", res, wall))
    t0 = time.perf_counter()
    ppl = evaluate_perplexity(model, docs, batch_size=args.batch_size)
    t_ppl = time.perf_counter() - t0

    ref = rows[0][2]
    print(f"\n{task.name}: {len(task.test)} test, {args.shots}-shot, seeds {list(seeds)}, model {model.name} "
          f"({sum(p.numel() for p in model.model.parameters()) / 1e6:.2f}M params), torch threads "
          f"{torch.get_num_threads()}, tokenizer trained in {t_tok:.1f}s\n")
    print("| run | label scoring | accuracy (mean ± std) | macro-F1 | majority acc | prompts dropped demos | wall s | vs per-label |")
    print("|---|---|---|---|---|---|---|---|")
    for name, res, wall in rows:
        print(f"| few-shot {task.name} | {name} | {res['accuracy']['mean']:.3f} ± {res['accuracy']['std']:.3f} | "
              f"{res['macro_f1']['mean']:.3f} | {res['baselines']['majority']['accuracy']:.3f} | "
              f"{res['n_truncated_prompts']} / {len(task.test) * len(seeds)} | {wall:.1f} | {ref / wall:.2f}× |")
    print(f"| perplexity corpus_dev valid ({ppl['n_docs']} docs) | — | ppl {ppl['perplexity']:.1f}, "
          f"{ppl['bits_per_byte']:.2f} bits/byte | — | — | {ppl['n_windows']} windows | {t_ppl:.1f} | "
          f"{ppl['tokens_per_s']:.0f} tok/s |")
    assert rows[0][1]["accuracy"] == rows[1][1]["accuracy"], "single-pass and per-label scoring disagree"


if __name__ == "__main__":
    main()

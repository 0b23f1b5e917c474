"""Inference cost of merged models: perplexity-evaluation throughput (tokens/s) and peak GPU memory.

Compares, in one run on one device: one expert; the c-BTM SparseEnsemble of n experts with top_k = 1, 2, n
(routing once per window from the document prefix, and top-2 re-routed every 128 tokens) on pooled batches of
pool × batch rows, each expert called on at most `batch` rows; the BTX MoE built
from the same experts (top-2). Experts are random-init Llama models of one architecture; documents are random
token windows with a random prefix text; routing uses a fixed random-projection bag-of-words embedder (the
cost of a TF-IDF-like embedder, not its quality). Prints a markdown table; ratios are against one expert.

    PYTHONPATH=. python bench/bench_merge.py                    # ~120M-param experts, 32 rows × 1024 per call (GPU)
    PYTHONPATH=. python bench/bench_merge.py --tiny --device cpu  # smoke test
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch


class ProjectionEmbedder:
    """Hashed bag of words (n_buckets) × fixed Gaussian projection → (n, dim), L2-normalised."""

    def __init__(self, dim: int = 100, n_buckets: int = 4096, seed: int = 0):
        self.proj = np.random.default_rng(seed).standard_normal((n_buckets, dim)).astype(np.float32)
        self.n_buckets = n_buckets

    def transform(self, texts):
        counts = np.zeros((len(texts), self.n_buckets), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                counts[i, zlib.crc32(w.encode()) % self.n_buckets] += 1
        x = counts @ self.proj
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def make_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<pad>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def build_experts(root: Path, n: int, shape: dict, seq: int, tokenizer) -> list[Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    dirs = []
    for j in range(n):
        cfg = LlamaConfig(max_position_embeddings=seq, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                          pad_token_id=2, **shape)
        torch.manual_seed(j)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        d = root / f"expert_{j}"
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        dirs.append(d)
        if j == 0:
            n_params = sum(p.numel() for p in model.parameters())
        del model
    return dirs, n_params


def measure(score, batches, device) -> dict:
    """Run `score(ids, mask, prefixes)` over batches (first one is warm-up); tokens/s and peak memory."""
    ids, mask, pre = batches[0]
    score(ids, mask, pre)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    n_tok = 0
    for ids, mask, pre in batches[1:]:
        score(ids, mask, pre)
        n_tok += int(mask[:, 1:].sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"tokens_per_s": n_tok / dt, "seconds": dt, "peak_gib": peak}


def main():
    from experts.ensemble import SparseEnsemble
    from experts.moe import build_moe
    from experts.scoring import HFCausalLM
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-experts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32, help="rows per model call (one expert, MoE, each ensemble expert)")
    ap.add_argument("--pool", type=int, default=4, help="ensemble batches hold pool × batch rows, split among experts")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=4, help="measured batches (plus one warm-up)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="tiny models for a CPU smoke test")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.tiny:
        shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4)
    else:  # ~120M params at vocab 32000: GPT-2-small-sized Llama
        shape = dict(vocab_size=32000, hidden_size=768, intermediate_size=1536, num_hidden_layers=12,
                     num_attention_heads=12, num_key_value_heads=12)
    tok = make_tokenizer(shape["vocab_size"])
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_merge_"))
    t0 = time.perf_counter()
    dirs, n_params = build_experts(root, args.n_experts, shape, args.seq, tok)
    moe_dir = build_moe(dirs, root / "moe", top_k=2)
    build_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    batches = []
    for _ in range(args.batches + 1):
        rows_per_batch = args.batch * args.pool
        ids = torch.as_tensor(rng.integers(4, shape["vocab_size"], (rows_per_batch, args.seq)))
        ids[:, 0] = 0
        prefixes = [" ".join(f"w{i}" for i in rng.integers(0, shape["vocab_size"] - 4, 64)) for _ in range(rows_per_batch)]
        batches.append((ids.to(device), torch.ones_like(ids).to(device), prefixes))

    def load(d):
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        return HFCausalLM(model, tok, device=device, max_length=args.seq)

    def free(*models):
        for m in models:
            m.model.to("cpu")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def micro(model):  # a single model scores a pooled batch in calls of `batch` rows
        def score(i, m, p):
            return [model.token_logprobs(i[a : a + args.batch], m[a : a + args.batch]) for a in range(0, len(i), args.batch)]
        return score

    rows = []
    one = load(dirs[0])
    r = measure(micro(one), batches, device)
    rows.append({"model": "one expert", **r, "expert_rows_per_row": 1.0})
    free(one)

    experts = [load(d) for d in dirs]
    embedder = ProjectionEmbedder()
    centroids = embedder.transform([" ".join(f"w{i}" for i in rng.integers(0, 1000, 50)) for _ in range(args.n_experts)])
    n = args.n_experts
    for top_k, route_every in [(1, args.seq), (2, args.seq), (n, args.seq), (2, 128)]:
        ens = SparseEnsemble(experts, centroids, embedder, top_k=top_k, temperature=0.1, route_every=route_every,
                             device=device, max_length=args.seq, expert_batch_size=args.batch)
        ens.reset_stats()
        r = measure(lambda i, m, p: ens.token_logprobs(i, m, p), batches, device)
        label = f"c-BTM top-{top_k}/{n}" + ("" if route_every == args.seq else f", re-route every {route_every}")
        rows.append({"model": label, **r,
                     "expert_rows_per_row": sum(ens.stats["rows"].values()) / (rows_per_batch * (args.batches + 1)),
                     "expert_calls_per_batch": sum(ens.stats["expert_calls"].values()) / (args.batches + 1)})
    free(*experts)
    del experts

    impls = ["default"]
    seen = set()
    for impl in impls + (["grouped_mm"] if device.type == "cuda" else []):
        try:
            kw = {} if impl == "default" else {"experts_implementation": impl}
            model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, **kw)
        except Exception as e:  # noqa: BLE001
            print(f"MoE with experts_implementation={impl} unavailable: {str(e).splitlines()[0][:120]}")
            continue
        used = getattr(model.config, "_experts_implementation", None)
        if used in seen:
            continue
        seen.add(used)
        moe = HFCausalLM(model, tok, device=device, max_length=args.seq)
        r = measure(micro(moe), batches, device)
        rows.append({"model": f"BTX MoE top-2/{n} ({used})", **r, "expert_rows_per_row": float("nan")})
        free(moe)

    base = rows[0]["tokens_per_s"]
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{n} experts of {n_params / 1e6:.0f}M params (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} "
          f"layers, vocab {shape['vocab_size']}), seq {args.seq}, {args.batch} rows per model call, ensemble batches of "
          f"{args.batch * args.pool} rows, {args.batches} measured batches, "
          f"{dev_name}, torch {torch.__version__}; build {build_s:.0f}s\n")
    print("| model | tokens/s | cost vs one expert | expert runs per row | expert calls per batch | peak GPU memory (GiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['tokens_per_s']:,.0f} | {base / r['tokens_per_s']:.2f}× | "
              f"{r['expert_rows_per_row']:.2f} | {r.get('expert_calls_per_batch', float('nan')):.1f} | {r['peak_gib']:.2f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": dev_name, "params": n_params, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

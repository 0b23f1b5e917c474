"""Inference cost of merged models: perplexity-evaluation throughput (tokens/s) and peak GPU memory.

Compares, in one run on one device: one expert; the c-BTM SparseEnsemble of n experts with top_k = 1, 2, n
(routing once per window from the document prefix, with the default posterior weights; top-2 also with the
paper's distance weights, re-routed every 128 tokens, and on windows without a prefix text, i.e. the first window
of a document, whose first 128 tokens go to all n experts) on pooled batches of pool × batch rows, each expert
called on at most `batch` full rows (more when they are short); the BTX MoE built
from the same experts (top-2). Experts are random-init Llama models of one architecture; documents are random
token windows with a random prefix text; routing uses a fixed random-projection bag-of-words embedder (the
cost of a TF-IDF-like embedder, not its quality). Prints a markdown table; ratios are against one expert.

    PYTHONPATH=. python bench/bench_merge.py                    # ~120M-param experts, 32 rows × 1024 per call (GPU)
    PYTHONPATH=. python bench/bench_merge.py --tiny --device cpu  # smoke test
    PYTHONPATH=. python bench/bench_merge.py --profile $OUT/profile.txt  # + per-phase and per-call timings

Batches are CPU tensors (as evaluation builds them) and no model is synchronised between batches.
"""
from __future__ import annotations

import argparse
import gc
import json
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
    """Run `score(ids, mask, prefixes)` over batches (first one is warm-up); tokens/s and peak memory.

    Batches are CPU tensors, as an evaluation loop builds them; nothing waits for the device between batches
    (the token count is taken beforehand), so a model that does not synchronise overlaps its CPU work with the
    device's.
    """
    ids, mask, pre = batches[0]
    score(ids, mask, pre)
    n_tok = sum(int(m[:, 1:].sum()) for _, m, _ in batches[1:])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for ids, mask, pre in batches[1:]:
        score(ids, mask, pre)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"tokens_per_s": n_tok / dt, "seconds": dt, "peak_gib": peak}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def phase_times(ens, batches, device) -> dict:
    """ms per batch spent routing (CPU, `_route`), in expert calls (`_run_expert`), and in the rest (mixing),
    each phase timed to completion on the device (so no overlap: the sum is slower than `measure`)."""
    times = {"routing": 0.0, "experts": 0.0}

    def timed(name, fn):
        def run(*a, **kw):
            _sync(device)
            t = time.perf_counter()
            out = fn(*a, **kw)
            _sync(device)
            times[name] += time.perf_counter() - t
            return out
        return run

    ens._route, ens._run_expert = timed("routing", ens._route), timed("experts", ens._run_expert)
    try:
        _sync(device)
        t0 = time.perf_counter()
        for ids, mask, pre in batches[1:]:
            ens.token_logprobs(ids, mask, pre)
        _sync(device)
        total = time.perf_counter() - t0
    finally:
        del ens._route, ens._run_expert  # back to the class methods
    n = len(batches) - 1
    return {"routing_ms": 1e3 * times["routing"] / n, "experts_ms": 1e3 * times["experts"] / n,
            "rest_ms": 1e3 * (total - times["routing"] - times["experts"]) / n, "total_ms": 1e3 * total / n}


def expert_call_times(model, batch, device, sizes=(8, 16, 32, 64), repeat: int = 5) -> list[dict]:
    """One expert on `rows` × seq rows: ms per call (timed to completion) and CPU ms until the call returns."""
    ids, mask, _ = batch
    out = []
    for rows in sizes:
        i, m = ids[:rows], mask[:rows]
        model.token_logprobs(i, m)
        _sync(device)
        cpu = wall = 0.0
        for _ in range(repeat):
            t = time.perf_counter()
            model.token_logprobs(i, m)
            cpu += time.perf_counter() - t
            _sync(device)
            wall += time.perf_counter() - t
        out.append({"rows": rows, "ms_per_call": 1e3 * wall / repeat, "cpu_ms_per_call": 1e3 * cpu / repeat,
                    "tokens_per_s": rows * (ids.shape[1] - 1) * repeat / wall})
    return out


def torch_profile(score, batch, path: Path, label: str) -> None:
    """torch.profiler tables (top ops by device time and by CPU time) for one call, appended to `path`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        score(*batch)
        _sync(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    ka = prof.key_averages()
    sort_dev = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    with open(path, "a") as f:
        f.write(f"\n==== {label}: by device time\n{ka.table(sort_by=sort_dev, row_limit=20)}\n")
        f.write(f"\n==== {label}: by CPU time\n{ka.table(sort_by='self_cpu_time_total', row_limit=20)}\n")


def main():
    from experts.ensemble import SparseEnsemble
    from experts.moe import build_moe
    from experts.scoring import HFCausalLM
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-experts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32, help="rows per model call (one expert, MoE, each ensemble expert)")
    ap.add_argument("--pool", type=int, nargs="+", default=[4],
                    help="ensemble batches hold pool × batch rows, split among experts; further values add top-2 rows")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=6, help="measured batches (plus one warm-up)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="tiny models for a CPU smoke test")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--profile", default=None, help="also time phases and per-call costs; torch.profiler tables here")
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

    def make_batches(rows_per_batch):  # CPU tensors: random tokens after BOS, a 64-word prefix text per row
        out = []
        for _ in range(args.batches + 1):
            ids = torch.as_tensor(rng.integers(4, shape["vocab_size"], (rows_per_batch, args.seq)))
            ids[:, 0] = 0
            prefixes = [" ".join(f"w{i}" for i in rng.integers(0, shape["vocab_size"] - 4, 64)) for _ in range(rows_per_batch)]
            out.append((ids, torch.ones_like(ids), prefixes))
        return out

    pool = args.pool[0]
    batches = {pool: make_batches(args.batch * pool)}
    profile = Path(args.profile) if args.profile else None
    if profile is not None:
        profile.parent.mkdir(parents=True, exist_ok=True)
        profile.write_text("")

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

    rows, phases, calls = [], [], []
    one = load(dirs[0])
    r = measure(micro(one), batches[pool], device)
    rows.append({"model": "one expert", **r, "expert_rows_per_row": 1.0})
    if profile is not None:
        calls = expert_call_times(one, batches[pool][0], device)
        torch_profile(micro(one), batches[pool][1], profile, f"one expert, {args.batch * pool} rows")
    free(one)

    experts = [load(d) for d in dirs]
    embedder = ProjectionEmbedder()
    centroids = embedder.transform([" ".join(f"w{i}" for i in rng.integers(0, 1000, 50)) for _ in range(args.n_experts)])
    n = args.n_experts
    # (top_k, route_every, pool, route_weights, prefix texts given)
    configs = [(1, args.seq, pool, "posterior", True), (2, args.seq, pool, "posterior", True),
               (n, args.seq, pool, "posterior", True), (2, args.seq, pool, "distance", True),
               (2, 128, pool, "posterior", True), (2, 128, pool, "posterior", False)]
    configs += [(2, args.seq, p, "posterior", True) for p in args.pool[1:]]
    for top_k, route_every, p, route_weights, with_prefix in configs:
        if p not in batches:
            batches[p] = make_batches(args.batch * p)
        ens = SparseEnsemble(experts, centroids, embedder, top_k=top_k, temperature=0.1, route_every=route_every,
                             route_weights=route_weights, device=device, max_length=args.seq,
                             expert_batch_size=args.batch)
        ens.reset_stats()
        data = batches[p] if with_prefix else [(i, m, [""] * len(i)) for i, m, _ in batches[p]]
        r = measure(lambda i, m, pr: ens.token_logprobs(i, m, pr), data, device)
        ens.check_finite()
        label = f"c-BTM top-{top_k}/{n}" + ("" if route_weights == "posterior" else f", {route_weights} weights")
        label += "" if route_every == args.seq else f", re-route every {route_every}"
        label += "" if with_prefix else ", no prefix text"
        label += "" if p == pool else f" ({args.batch * p}-row batches)"
        n_batches = args.batches + 1
        rows.append({"model": label, **r,
                     "expert_rows_per_row": sum(ens.stats["rows"].values()) / (args.batch * p * n_batches),
                     "expert_calls_per_batch": sum(ens.stats["expert_calls"].values()) / n_batches})
        if profile is not None and route_every == args.seq:
            phases.append({"model": label, **phase_times(ens, data, device)})
            if top_k == 2 and p == pool and route_weights == "posterior":
                torch_profile(lambda i, m, pr: ens.token_logprobs(i, m, pr), data[1], profile, label)
    free(*experts)
    del experts

    seen = set()
    for impl in ["default"] + (["grouped_mm"] if device.type == "cuda" else []):
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
        r = measure(micro(moe), batches[pool], device)
        rows.append({"model": f"BTX MoE top-2/{n} ({used})", **r, "expert_rows_per_row": float("nan")})
        free(moe)

    base = rows[0]["tokens_per_s"]
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{n} experts of {n_params / 1e6:.0f}M params (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} "
          f"layers, vocab {shape['vocab_size']}), seq {args.seq}, {args.batch} rows per model call, ensemble batches of "
          f"{args.batch * pool} rows, {args.batches} measured batches, "
          f"{dev_name}, torch {torch.__version__}; build {build_s:.0f}s\n")
    def num(x, fmt):
        return "–" if x is None or x != x else format(x, fmt)

    def table(header: str, lines: list[str]) -> None:
        cols = header.count("|") - 1
        print(header)
        print("|---" + "|---:" * (cols - 1) + "|")
        print("\n".join(lines) + "\n")

    if calls:
        table("| one expert: rows per call | ms per call | CPU ms until the call returns | tokens/s |",
              [f"| {c['rows']} | {c['ms_per_call']:.1f} | {c['cpu_ms_per_call']:.1f} | {c['tokens_per_s']:,.0f} |"
               for c in calls])
    if phases:
        table("| ensemble (each phase run to completion) | routing ms/batch | expert calls ms/batch | rest ms/batch | "
              "total ms/batch |",
              [f"| {ph['model']} | {ph['routing_ms']:.1f} | {ph['experts_ms']:.1f} | {ph['rest_ms']:.1f} | "
               f"{ph['total_ms']:.1f} |" for ph in phases])
    table("| model | tokens/s | cost vs one expert | expert runs per row | expert calls per batch | peak GPU memory (GiB) |",
          [f"| {r['model']} | {r['tokens_per_s']:,.0f} | {base / r['tokens_per_s']:.2f}× | "
           f"{num(r['expert_rows_per_row'], '.2f')} | {num(r.get('expert_calls_per_batch'), '.1f')} | "
           f"{num(r['peak_gib'], '.2f')} |" for r in rows])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": dev_name, "params": n_params, "rows": rows, "phases": phases,
                                               "expert_calls": calls}, indent=2))


if __name__ == "__main__":
    main()

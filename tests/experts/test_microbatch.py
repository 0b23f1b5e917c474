"""Micro-batches: exact splits of the global batch, the auto size search, the background reader, and training
with unequal micro-batches (tiny in-code Llama, CPU)."""
import numpy as np
import pytest
import torch

from corpus.io import InputError
from experts.data import PackedBlocks, Prefetcher
from experts.microbatch import (
    CPU_MICRO_BATCH, candidate_sizes, largest_fitting, memory_fraction, no_fit_message, split_blocks,
)
from experts.model import ModelPreset, build_scratch_model
from tests.experts.train_helpers import PRESET, SEQ, VOCAB, write_shard
from experts.training import TrainConfig, plan_training, train_model

@pytest.fixture
def shard(tmp_path):
    return write_shard(tmp_path)


def _cfg(**kw):
    base = dict(train_tokens=6 * 20 * SEQ, lr=3e-3, min_lr=3e-4, warmup_steps=1, log_every=2, checkpoint_every=0,
                device="cpu", compile=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("g", [1, 7, 16, 17, 128, 131])
@pytest.mark.parametrize("m", [1, 3, 8, 64])
def test_split_covers_the_global_batch_exactly(g, m):
    sizes = split_blocks(g, m)
    assert sum(sizes) == g and max(sizes) <= m and max(sizes) - min(sizes) <= 1
    assert len(sizes) == -(-g // m)  # as few micro-batches as the cap allows


def test_largest_fitting_bisects_the_candidates():
    assert candidate_sizes(17) == [17, 9, 6, 5, 4, 3, 2, 1]
    for limit in range(0, 20):
        log = []
        got = largest_fitting(17, lambda m: m <= limit, log)
        assert got == (None if limit == 0 else max(c for c in candidate_sizes(17) if c <= limit))
        assert len(log) <= 4 and all(e["fits"] == (e["micro_batch"] <= limit) for e in log)


def test_memory_fraction_leaves_room_for_every_context():
    total = 141 * 2**30
    for n in (1, 2, 8, 16):
        f = memory_fraction(n, total)
        assert 0 < f <= 1 / n and n * (f * total + (768 << 20)) <= total * 1.0001


def test_no_fit_messages_name_the_model_the_block_and_the_flag():
    msg = no_fit_message(7_000_000_000, 4096, "NVIDIA H200", 100 * 2**30, 141 * 2**30, 1, None)
    assert "7000M-parameter" in msg and "4096 tokens" in msg and "--model-size" in msg and "\n" not in msg
    msg = no_fit_message(134_000_000, 1024, "NVIDIA H200", 2 * 2**30, 141 * 2**30, 64, need_bytes=9 * 2**30)
    assert "--experts-per-gpu 64" in msg and "at most 13 fit" in msg and "\n" not in msg


def test_plan_splits_exactly_and_auto_keeps_the_cpu_default():
    plan = plan_training(_cfg(micro_batch_size=8, global_batch_tokens=17 * SEQ), SEQ)
    assert plan.micro_batches == [6, 6, 5] and plan.tokens_per_step == 17 * SEQ and plan.blocks_per_step == 17
    plan = plan_training(_cfg(), SEQ)  # auto, no --batch-tokens: 8 blocks per step as the old default
    assert plan.micro_batches == [CPU_MICRO_BATCH]
    plan = plan_training(_cfg(global_batch_tokens=20 * SEQ), SEQ, world_size=2)  # 10 blocks per device
    assert plan.micro_batches == [5, 5] and plan.blocks_per_step == 20
    starts = sorted(plan.micro_start(1, i, r) + j for i in range(2) for r in range(2) for j in range(5))
    assert starts == list(range(20, 40))  # step 1 reads blocks 20..39, each once, over micro-batches and ranks
    with pytest.raises(InputError, match="--micro-batch-size must be 'auto' or a positive integer"):
        _cfg(micro_batch_size="big")
    with pytest.raises(InputError, match="smaller than one block per device"):
        plan_training(_cfg(global_batch_tokens=SEQ), SEQ, world_size=2)


def test_auto_micro_batch_reproduces_the_global_batch(shard, tmp_path):
    """On CPU `auto` takes 8-block micro-batches; 20 blocks per step are 7+7+6, and the run equals one trained
    with a single 20-block micro-batch (losses and weights, to float rounding)."""
    auto = train_model(build_scratch_model(PRESET, VOCAB), [shard], tmp_path / "auto", _cfg(global_batch_tokens=20 * SEQ))
    assert auto["plan"]["micro_batches"] == [7, 7, 6] and auto["plan"]["tokens_per_step"] == 20 * SEQ
    assert auto["micro_batch"]["requested"] == "auto" and auto["tokens_seen"] == 6 * 20 * SEQ
    one = train_model(build_scratch_model(PRESET, VOCAB), [shard], tmp_path / "one",
                      _cfg(global_batch_tokens=20 * SEQ, micro_batch_size=20))
    assert one["plan"]["micro_batches"] == [20]
    np.testing.assert_allclose([l for _, l in auto["loss_curve"]], [l for _, l in one["loss_curve"]], rtol=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "auto" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)  # Adam magnifies rounding of tiny gradients


def test_unequal_micro_batches_accumulate_the_global_mean_gradient(shard):
    from experts.microbatch import accumulation_weight
    from experts.training.loss import CausalLMLoss

    model = build_scratch_model(PRESET, VOCAB)
    loss = CausalLMLoss.build(model, _cfg(), compile=False)
    x = torch.from_numpy(PackedBlocks([shard]).blocks(0, 20))
    loss(x)[0].backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    sizes, start = split_blocks(20, 8), 0
    for i, s in enumerate(sizes):
        (loss(x[start : start + s])[0] / accumulation_weight(sizes, i)).backward()
        start += s
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[n], rtol=1e-5, atol=1e-7)


def test_prefetcher_reads_the_schedule_in_order_and_hands_back_errors(shard):
    data = PackedBlocks([shard], seed=5)
    schedule = [(0, 3), (3, 5), (90, 10), (200, 2)]  # the last ones cross epochs
    pre = Prefetcher(data, schedule, depth=2)
    for start, count in schedule:
        assert torch.equal(pre.next(), torch.from_numpy(data.blocks(start, count)))
    with pytest.raises(RuntimeError, match="exhausted"):
        pre.next()
    pre.close()
    bad = Prefetcher(PackedBlocks([shard]), [(0, 2), (0, -1)])
    bad.next()
    with pytest.raises(ValueError):
        bad.next()
    bad.close()
    stopped = Prefetcher(data, ((i, 1) for i in range(10**9)), depth=1)  # an endless schedule stops on close
    stopped.next()
    stopped.close()
    assert not stopped._thread.is_alive()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_micro_batch_and_too_many_experts_per_gpu(shard, tmp_path):
    cfg = dict(device="cuda", compile=False, global_batch_tokens=32 * SEQ, train_tokens=4 * 32 * SEQ)
    res = train_model(build_scratch_model(PRESET, VOCAB), [shard], tmp_path / "a", _cfg(**cfg))
    assert res["plan"]["micro_batches"] == [32] and res["micro_batch"]["probes"][0] == {"micro_batch": 32, "fits": True}
    big = build_scratch_model(ModelPreset(1024, 8, 16, 4096, SEQ), 32000)
    with pytest.raises(InputError, match="--experts-per-gpu 2000 .* lower --experts-per-gpu"):
        train_model(big, [shard], tmp_path / "b", _cfg(**cfg, experts_per_gpu=2000))

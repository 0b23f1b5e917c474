"""Training loop invariants on tiny in-code Llama models (CPU, deterministic)."""
import os

import numpy as np
import pytest
import torch

from corpus.io import InputError
from experts.budget import compute_budget
from experts.model import ModelPreset, build_scratch_model
from experts.training import TrainConfig, checkpoint_dir, plan_training, train_model
from experts.training.loss import make_linear_cross_entropy
from experts.training.schedule import lr_at
from tests.experts.train_helpers import PRESET, SEQ, VOCAB, write_shard, Killed, kill_at, train_killed_at

@pytest.fixture
def shard(tmp_path):
    return write_shard(tmp_path)


def _model(seed=0):
    return build_scratch_model(PRESET, VOCAB, seed=seed)


def _cfg(**kw):
    base = dict(train_tokens=8 * 4 * SEQ, micro_batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, log_every=0,
                checkpoint_every=0, device="cpu", compile=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_after_kill_equals_uninterrupted(shard, tmp_path):
    cfg = _cfg(checkpoint_every=2)
    full = train_model(_model(), [shard], tmp_path / "full", cfg)

    out = tmp_path / "resumed"
    train_killed_at(5, _model(), [shard], out, cfg)
    assert not out.exists() and (checkpoint_dir(out) / "trainer_state.json").is_file()
    res = train_model(_model(seed=99), [shard], out, cfg)  # fresh init: everything must come from the checkpoint
    assert res["resumed_at"] == [4]
    assert res["loss_curve"] == full["loss_curve"]  # exact, all 8 steps
    assert not checkpoint_dir(out).exists()
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_grad_accumulation_matches_big_batch(shard, tmp_path):
    one = train_model(_model(), [shard], tmp_path / "one", _cfg(train_tokens=16 * SEQ, micro_batch_size=16, warmup_steps=0))
    acc = train_model(_model(), [shard], tmp_path / "acc",
                      _cfg(train_tokens=16 * SEQ, micro_batch_size=4, global_batch_tokens=16 * SEQ, warmup_steps=0))
    assert one["steps"] == acc["steps"] == 1 and acc["plan"]["grad_accum"] == 4
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "acc" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_fused_loss_matches_full_logits():
    torch.manual_seed(0)
    h = torch.randn(37, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    loss = make_linear_cross_entropy()(h, w, t, 3)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


def test_training_lowers_loss_and_writes_outputs(shard, tmp_path):
    res = train_model(_model(), [shard], tmp_path / "m", _cfg(train_tokens=30 * 4 * SEQ), valid_paths=[shard])
    assert res["loss_curve"][-1][1] < res["loss_curve"][0][1] - 0.5
    assert res["tokens_seen"] == 30 * 4 * SEQ and res["steps"] == 30
    assert res["valid_loss"] is not None and np.isfinite(res["valid_loss"])
    assert {"config.json", "model.safetensors", "training.json"} <= {p.name for p in (tmp_path / "m").iterdir()}
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_compute_budget_matches_dense_and_experts():
    b = compute_budget(1_000_000, 0.5, 4)
    assert b["seed_tokens"] == 500_000 and b["expert_tokens"] == 125_000 and b["dense_tokens"] == 500_000
    assert b["seed_tokens"] + 4 * b["expert_tokens"] + b["rounding"] == 1_000_000
    b = compute_budget(1000, 0.3, 7)
    assert b["seed_tokens"] + b["dense_tokens"] == 1000
    assert b["dense_tokens"] - 7 * b["expert_tokens"] == b["rounding"] < 7
    with pytest.raises(InputError, match="--seed-fraction"):
        compute_budget(1000, 1.0, 2)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_seed_then_branch_on_one_schedule_is_one_uninterrupted_schedule(decay):
    """--branch-schedule continue: the seed's S steps and a branch's D steps (at another batch) together give the
    LR sequence of a single run of S + D steps: one warmup, one decay, no restart at the branch."""
    seed_steps, branch_steps, block = 30, 10, 4 * SEQ
    whole = _cfg(train_tokens=(seed_steps + branch_steps) * block, warmup_steps=None, warmup_fraction=0.1,
                 decay=decay)
    seed = _cfg(train_tokens=seed_steps * block, warmup_steps=None, warmup_fraction=0.1, decay=decay,
                schedule_steps=seed_steps + branch_steps)
    branch = _cfg(train_tokens=branch_steps * SEQ, global_batch_tokens=SEQ, warmup_steps=None, warmup_fraction=0.1,
                  decay=decay, schedule_steps=seed_steps + branch_steps, schedule_start=seed_steps)
    plans = [plan_training(c, SEQ) for c in (whole, seed, branch)]
    assert (plans[1].steps, plans[2].steps) == (seed_steps, branch_steps)
    one = [lr_at(i, whole, plans[0]) for i in range(seed_steps + branch_steps)]
    two = [lr_at(i, seed, plans[1]) for i in range(seed_steps)] + [lr_at(i, branch, plans[2]) for i in range(branch_steps)]
    assert two == pytest.approx(one, rel=1e-12)
    assert max(two[seed_steps:]) < two[seed_steps - 1]  # the branch does not warm up again
    assert two[-1] > whole.min_lr and one[-1] == pytest.approx(two[-1])


def test_bad_inputs_give_clear_messages(shard, tmp_path):
    with pytest.raises(InputError, match="fewer than one global batch.*--assign balanced"):
        train_model(_model(), [shard], tmp_path / "x", _cfg(micro_batch_size=200, train_tokens=10**6))
    with pytest.raises(InputError, match="budget too small for warmup"):
        plan_training(_cfg(train_tokens=3 * 4 * SEQ, warmup_steps=5), SEQ)
    with pytest.raises(InputError, match="less than one global batch"):
        plan_training(_cfg(train_tokens=10), SEQ)
    with pytest.raises(InputError, match="--decay"):
        _cfg(decay="step")
    with pytest.raises(InputError, match="seed model path does not exist"):
        train_model(str(tmp_path / "nope"), [shard], tmp_path / "x", _cfg())


def test_moe_router_aux_loss_and_stats(shard, tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg)
    res = train_model(model, [shard], tmp_path / "moe", _cfg(train_tokens=4 * 4 * SEQ, router_aux_loss_coef=0.01))
    r = res["router"]
    assert len(r["expert_load"]) == 4 and abs(sum(r["expert_load"]) - 1) < 1e-6
    assert 0 < r["routing_entropy"] <= np.log(4) + 1e-6
    assert np.isfinite(res["final_loss"])


@pytest.mark.skipif(
    not os.environ.get("CBTM_TEST_DDP"),
    reason="two torchrun ranks on CPU (gloo) take ~25 s on 2 cores (each imports torch+transformers); set CBTM_TEST_DDP=1",
)
def test_ddp_two_cpu_processes_equal_one_process(shard, tmp_path):
    from experts.launch import launch_training

    init = tmp_path / "init"
    _model().save_pretrained(init)
    cfg = _cfg(train_tokens=3 * 8 * SEQ, micro_batch_size=2, global_batch_tokens=8 * SEQ, warmup_steps=0)
    single = train_model(str(init), [shard], tmp_path / "single", cfg)
    ddp = launch_training(str(init), [shard], tmp_path / "ddp", cfg, cpu_procs=2, timeout=120)
    assert ddp["world_size"] == 2 and ddp["plan"]["grad_accum"] == 2
    np.testing.assert_allclose([l for _, l in ddp["loss_curve"]], [l for _, l in single["loss_curve"]], rtol=1e-4)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "single" / "model.safetensors")), load_file(str(tmp_path / "ddp" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_master_weights_bf16_model_fp32_optimizer():
    from experts.training.optim import MasterWeights

    model = build_scratch_model(ModelPreset(32, 2, 4, 64, SEQ, True), VOCAB)  # tied embeddings
    fp32 = dict(model.named_parameters())
    mw = MasterWeights(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert {id(p) for p in mw.masters} == {id(p) for p in fp32.values()} and len(mw.lows) == len(mw.masters)
    x = torch.randint(0, VOCAB, (2, SEQ))
    for _ in range(2):  # two micro-batches: gradients are summed into the fp32 masters, bf16 grads freed
        model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(m.grad is not None and m.grad.dtype == torch.float32 for m in mw.masters)
    for m, low in zip(mw.masters, mw.lows):  # the bf16 weights start as bf16(master); step() keeps them so (below)
        assert torch.equal(low, m.to(torch.bfloat16))
    with mw.fp32_model():
        assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())
    assert model.model.norm.weight.dtype == torch.bfloat16
    mw.restore()
    assert all(p is fp32[n] for n, p in model.named_parameters())


@pytest.mark.parametrize("accumulate", [False, True])
def test_master_step_equals_clip_adamw_and_copy(accumulate):
    """MasterWeights.step = clip_grad_norm_ + torch AdamW.step + bf16 copy, with or without gradient accumulation."""
    import copy

    from experts.training.optim import MasterWeights

    model = build_scratch_model(ModelPreset(32, 2, 4, 64, SEQ, True), VOCAB)
    ref = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    ref_params = dict(ref.named_parameters())
    mw = MasterWeights(model, torch.bfloat16, accumulate=accumulate)

    def groups(params):
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

    masters = dict(zip(names, mw.masters))  # named_parameters() and masters follow the same module order
    opt = torch.optim.AdamW(groups(list(masters.values())), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref_opt = torch.optim.AdamW(groups([ref_params[n] for n in names]), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step, lr in enumerate([1e-2, 5e-3, 2e-3]):
        x = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(step))
        for _ in range(2 if accumulate else 1):
            model(input_ids=x, labels=x).loss.backward()
        for n in names:  # the reference sees exactly the fp32 gradients the masters are updated with
            low = mw._low_of[id(masters[n])]
            ref_params[n].grad = (masters[n].grad if accumulate else low.grad.float()).clone()
        for o in (opt, ref_opt):
            for g in o.param_groups:
                g["lr"] = lr
        total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        assert total > 0.05  # clipping is active
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        mw.step(opt, 0.05)
        opt.zero_grad(set_to_none=True)
        assert all(low.grad is None for low in mw.lows) and all(m.grad is None for m in mw.masters)
        for n in names:
            torch.testing.assert_close(masters[n], ref_params[n], rtol=1e-6, atol=1e-7)
            assert torch.equal(mw._low_of[id(masters[n])], masters[n].to(torch.bfloat16))
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()
    for a, b in zip(opt.state_dict()["state"].values(), ref_opt.state_dict()["state"].values()):
        assert a.keys() == b.keys() and float(a["step"]) == float(b["step"]) == 3
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-6, atol=1e-12)


def test_bf16_params_train_and_resume_exactly(shard, tmp_path):
    cfg = _cfg(checkpoint_every=2, bf16_params=True)
    full = train_model(_model(), [shard], tmp_path / "full", cfg)
    assert full["bf16_params"] and full["loss_curve"][-1][1] < full["loss_curve"][0][1]

    out = tmp_path / "resumed"
    train_killed_at(5, _model(), [shard], out, cfg)
    res = train_model(_model(seed=99), [shard], out, cfg)
    assert res["resumed_at"] == [4] and res["loss_curve"] == full["loss_curve"]
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.float32 and torch.equal(a[k], b[k]), k  # the fp32 masters are saved
    train_model(_model(), [shard], tmp_path / "fp32", _cfg())
    fp32 = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    assert any(not torch.equal(a[k], fp32[k]) for k in a)  # bf16 compute really ran


def test_cached_rotary_leaves_outputs_unchanged():
    from experts.training.patches import cache_rotary, restore_rotary

    x = torch.randint(0, VOCAB, (3, SEQ))
    for dtype in (torch.float32, torch.bfloat16):  # tables are cast to the activations' dtype, as HF does
        model = _model().to(dtype).eval()
        ref = model(input_ids=x).logits
        original = model.model.rotary_emb
        assert cache_rotary(model, SEQ) is original and model.model.rotary_emb is not original
        torch.testing.assert_close(model(input_ids=x).logits, ref, rtol=0, atol=0)
        restore_rotary(model, original)
        assert model.model.rotary_emb is original


def test_uneven_micro_batches_match_one_big_batch(shard, tmp_path):
    """A per-device batch that is not a multiple of the micro-batch (an expert's share of the dense batch) ends
    each step with a smaller micro-batch, weighted by its size: the same update as one batch of all blocks."""
    one = train_model(_model(), [shard], tmp_path / "one", _cfg(train_tokens=2 * 6 * SEQ, micro_batch_size=6, warmup_steps=0))
    acc = train_model(_model(), [shard], tmp_path / "acc",
                      _cfg(train_tokens=2 * 6 * SEQ, micro_batch_size=4, global_batch_tokens=6 * SEQ, warmup_steps=0))
    assert acc["plan"]["grad_accum"] == 2 and sum(acc["plan"]["micro_batches"]) == 6 and acc["steps"] == 2
    assert acc["tokens_seen"] == one["tokens_seen"] == 12 * SEQ
    for (_, a), (_, b) in zip(one["loss_curve"], acc["loss_curve"]):
        assert abs(a - b) < 1e-5
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "acc" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    small = plan_training(_cfg(micro_batch_size=8, global_batch_tokens=3 * SEQ), SEQ)  # below one micro-batch
    assert (small.micro_batch_size, small.grad_accum, small.tokens_per_step) == (3, 1, 3 * SEQ)


@pytest.fixture
def noise_shard(tmp_path):
    """Uniform random tokens: the more a model learns the patterned training shard, the worse it does here."""
    path = tmp_path / "valid_cluster_000.npy"
    np.save(path, np.random.default_rng(1).integers(0, VOCAB, (8, SEQ)).astype(np.uint16))
    return str(path)


def _valid_loss(model_dir, shard_path) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    x = torch.from_numpy(np.load(shard_path).astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=x).logits[:, :-1]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1)))


def test_keep_best_saves_the_lowest_validation_loss_and_survives_resume(shard, noise_shard, tmp_path):
    cfg = _cfg(train_tokens=12 * 4 * SEQ, eval_every=2, keep_best=True, checkpoint_every=4)
    res = train_model(_model(), [shard], tmp_path / "best", cfg, valid_paths=[noise_shard])
    curve = res["valid_curve"]
    assert [s for s, _ in curve] == [2, 4, 6, 8, 10, 12]
    best_step, best_loss = min(curve, key=lambda t: t[1])  # min keeps the earlier of equal losses
    assert res["kept_step"] == best_step < 12 and res["valid_loss"] == best_loss  # the guard had work to do
    assert res["final_valid_loss"] == curve[-1][1] > best_loss
    assert abs(_valid_loss(tmp_path / "best", noise_shard) - best_loss) < 1e-4  # the saved weights are the best's
    # without the guard the last weights are saved
    last = train_model(_model(), [shard], tmp_path / "last", _cfg(train_tokens=12 * 4 * SEQ, eval_every=2),
                       valid_paths=[noise_shard])
    assert last["kept_step"] == 12 and last["valid_curve"] == curve
    assert abs(_valid_loss(tmp_path / "last", noise_shard) - curve[-1][1]) < 1e-4
    # killed after the best evaluation and a checkpoint, resumed from fresh weights: the same model is kept
    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        train_model(_model(), [shard], out, cfg, valid_paths=[noise_shard], on_step=kill_at(best_step + 5))
    resumed = train_model(_model(seed=99), [shard], out, cfg, valid_paths=[noise_shard])
    assert resumed["resumed_at"] and resumed["valid_curve"] == curve and resumed["kept_step"] == best_step
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "best" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_bf16_checkpoint_trains_with_fp32_weights_on_cpu(shard, tmp_path):
    """A seed saved in bf16 (as most downloads are) trains like its fp32 copy: the optimizer updates fp32 weights,
    not bf16 ones (whose small updates round away), and training.json says what the checkpoint held."""
    seed = tmp_path / "bf16_seed"
    _model().to(torch.bfloat16).save_pretrained(seed)
    res = train_model(str(seed), [shard], tmp_path / "out", _cfg())
    assert res["init_dtype"] == "torch.bfloat16" and res["bf16_params"] is False
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(seed, dtype=torch.float32)
    ref = train_model(fp32, [shard], tmp_path / "ref", _cfg())
    assert res["loss_curve"] == ref["loss_curve"]
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert {p.dtype for p in trained.parameters()} == {torch.float32}

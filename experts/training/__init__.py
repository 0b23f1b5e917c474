"""Training of seeds, experts, the dense baseline and BTX MoE finetuning: `train_model(init, shard_paths, out_dir,
config)` with a `TrainConfig`. Inside, one file per concern, and the loop that calls them:

- `config`: `TrainConfig`, the hyper-parameters of one run, checked once
- `schedule`: `plan_training` (budget → `TrainPlan`: micro-batches, steps, warmup), `lr_at`, throughput and MFU
- `loss`: `CausalLMLoss`, the chunked fused linear + cross-entropy (`make_linear_cross_entropy`)
- `optim`: `MasterWeights`, fp32 master weights and one fused clip + AdamW + bf16-copy update
- `patches`: causal SDPA without a mask, RoPE from tables, `sdpa_context`; undone before saving
- `checkpoint`: the resumable `<out_dir>.ckpt/` folder (`checkpoint_dir`, `save_checkpoint`, `load_checkpoint`)
- `distributed`: several devices (DDP, FSDP2 `shard_model`)
- `metrics`: `RouterStats`, an MoE's expert load and routing entropy
- `events`: `LiveMetrics`, TensorBoard event files written while training (`<out_dir>/tensorboard/`)
- `loop`: `train_model`, which runs `TrainRecipe` (setup, train, save), the recipe that calls them
"""
import importlib

_HOMES = {"checkpoint_dir": "checkpoint", "TrainConfig": "config", "train_model": "loop", "TrainPlan": "schedule",
          "plan_training": "schedule"}


def __getattr__(name: str):
    """`from experts.training import X` loads X's module on first use: the pipeline reads `TrainConfig`'s choices
    while it builds its graph, without torch (`config` imports none; the loop does)."""
    if name in _HOMES:
        return getattr(importlib.import_module(f"experts.training.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'experts.training' has no attribute {name!r}")


__all__ = ["TrainConfig", "TrainPlan", "checkpoint_dir", "plan_training", "train_model"]

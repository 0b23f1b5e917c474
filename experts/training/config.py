"""`TrainConfig`: the hyper-parameters of one training run, checked once where they are owned."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from corpus.io import ConfigError, InputError

SHARDINGS = ("ddp", "fsdp")  # `sharding` (the first is the default)
TRAINABLE = ("all", "ffn")  # `trainable` (the first is the default)


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run, checked when built: a value out of range raises
    `corpus.io.ConfigError` naming the field (`TrainConfig.min_lr`), which the pipeline maps to its flag. A field's
    docstring names the pipeline flag that sets it, where one does."""

    train_tokens: int
    """Token budget of this run (the pipeline splits --train-tokens into the seed's, the dense model's and each
    expert's, `experts.budget`): steps = train_tokens // global batch tokens."""
    micro_batch_size: int | str = "auto"
    """Blocks per forward/backward on one device (--micro-batch-size), or 'auto': the largest that fits the
    device's memory, probed before training (`experts.microbatch`); CPU_MICRO_BATCH (8) on CPU. Either way the
    global batch is covered exactly (`experts.microbatch.split_blocks`)."""
    global_batch_tokens: int | None = None
    """Tokens per optimizer step over all devices (--batch-tokens), rounded down to whole blocks per device;
    None = one micro-batch per device (8 blocks with micro_batch_size 'auto')."""
    lr: float = 3e-4
    """Peak learning rate (--learning-rate)."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay (the pipeline sets lr / 10 with --learning-rate)."""
    warmup_steps: int | None = None
    """Linear warmup steps; None = round(warmup_fraction · steps)."""
    warmup_fraction: float = 0.02
    """Fraction of steps used for warmup when warmup_steps is None."""
    decay: str = "cosine"
    """Decay after warmup: 'cosine' or 'linear'."""
    schedule_steps: int | None = None
    """Steps of the whole learning-rate schedule this run is a part of; None = this run's own steps. A seed that
    trains the first part of a schedule and a branch that trains the rest give one warmup and one decay."""
    schedule_start: int = 0
    """The schedule's step at this run's first step (0: the run starts the schedule, warmup included)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (not on norms/biases)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables."""
    seed: int = 0
    """Seeds torch/numpy/python RNGs and the data order (--seed)."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N' (--device); under torchrun each rank uses cuda:LOCAL_RANK."""
    compile: bool | None = None
    """torch.compile the model and loss (--compile on/off); None (--compile auto) = on for CUDA, off on CPU."""
    fused_loss: bool = True
    """Chunked fused linear + cross-entropy instead of full logits (`experts.training.loss`)."""
    loss_chunks: int = 1
    """Number of token chunks the fused loss splits each micro-batch into: memory for the bf16 logits and their
    gradient (≈ 4·micro_batch·seq·V/loss_chunks bytes) vs. kernel size (measured in bench/RESULTS.md)."""
    eval_every: int = 0
    """Validation loss every N steps (--eval-every); 0 = only at the end. Needs valid shards."""
    keep_best: bool = False
    """Overfitting guard (--keep-best): save the weights of the evaluation (every eval_every steps and at the end)
    with the lowest validation loss instead of the last ones (ties: the earlier). The best weights travel with the
    resumable checkpoint, so a resumed run keeps the same ones. Without valid shards the last weights are kept."""
    eval_tokens: int = 262144
    """Tokens of the validation shards scored per evaluation."""
    checkpoint_every: int = 200
    """Write a resumable checkpoint every N steps (`experts.training.checkpoint`); 0 = never."""
    log_every: int = 10
    """Log loss, tokens/s and MFU every N steps."""
    router_aux_loss_coef: float = 0.0
    """BTX MoE finetuning: add coef × load-balancing aux loss (Switch/Mixtral) to the LM loss; 0 = none."""
    max_steps: int | None = None
    """Stop after this many steps whatever the budget says."""
    sdpa_backend: str | None = None
    """Force one SDPA attention kernel: 'flash', 'cudnn', 'efficient' or 'math'; None = torch's pick."""
    causal_sdpa: bool = True
    """Attention as SDPA with is_causal=True and no materialised (B, 1, T, T) mask, for models whose HF attention
    is plain causal SDPA (no padding in packed blocks, no sliding window shorter than the block); False keeps
    HF's own mask building (which, under torch.compile on torch < 2.14, always materialises the mask, so
    the kernel cannot skip the masked upper triangle)."""
    compile_mode: str | None = None
    """torch.compile mode, e.g. 'max-autotune-no-cudagraphs'; None = the default mode."""
    compile_graph: str = "whole"
    """What one torch.compile graph covers with the fused loss: 'whole' = backbone + final
    slice + chunked linear cross-entropy as one graph; 'backbone' = the backbone, and each loss chunk apart."""
    cache_rope: bool = True
    """Look RoPE's cos/sin up in tables computed once (`cache_rotary`) instead of recomputing them in every layer's
    fused kernels; outputs are unchanged."""
    bf16_params: bool | None = None
    """bf16 model parameters (so bf16 activations and residual stream) with fp32 master weights, gradients and
    AdamW moments in the optimizer (`MasterWeights`). None = on for one CUDA device with bf16, off on CPU and
    under DDP. Checkpoints and the saved model hold the fp32 master weights."""
    compile_update: bool | None = None
    """With bf16_params: compile the optimizer update (gradient clipping, AdamW on the fp32 masters, bf16 copy) into
    a few fused kernels (`MasterWeights.step`); None = when the model is compiled. The compilation runs
    in a process's first step (its cost: bench/RESULTS.md); inductor's on-disk cache saves it later processes on
    the same machine."""
    ddp_backend: str | None = None
    """Process-group backend when launched by torchrun: None = nccl on CUDA, gloo on CPU."""
    experts_per_gpu: int = 1
    """Training processes sharing this GPU (--experts-per-gpu): each may allocate 1/N of its memory (what is left
    after N CUDA contexts), which `micro_batch_size='auto'` then fits into."""
    trainable: str = "all"
    """Which parameters train (--expert-trainable, experts only): 'all', or 'ffn' = only the decoder layers' feed-forward blocks (`.mlp.`), the
    seed's attention, norms and embeddings frozen (FlexOlmo, Shi et al. 2025: experts trained so against one
    frozen seed share every non-FFN weight, so an MoE of their FFNs loses nothing at the merge)."""
    sharding: str = "ddp"
    """How a model spread over several devices is split (--sharding): 'ddp' (a full copy of weights, gradients
    and AdamW moments per device, gradients all-reduced) or 'fsdp' (FSDP2 `fully_shard` per decoder layer + root:
    each device holds 1/world of them, weights all-gathered per layer; for models that do not fit on one GPU).
    Ignored on one device."""

    def __post_init__(self):
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if isinstance(self.micro_batch_size, str) and self.micro_batch_size.strip().isdigit():
            self.micro_batch_size = int(self.micro_batch_size)

        def bad(name: str, what: str) -> ConfigError:
            return ConfigError(f"TrainConfig.{name}", what)

        # (valid?, the error otherwise): a ConfigError names the field, and the pipeline maps it to its flag. Three
        # messages still name a flag, because tests pin their text (tests/experts/test_microbatch.py, test_train.py,
        # test_fsdp.py): micro_batch_size, decay and sharding.
        checks = [
            (self.train_tokens > 0, bad("train_tokens", f"must be positive, got {self.train_tokens}")),
            (self.micro_batch_size == "auto" or (isinstance(self.micro_batch_size, int) and self.micro_batch_size > 0),
             InputError(f"--micro-batch-size must be 'auto' or a positive integer, got {self.micro_batch_size!r}")),
            (self.experts_per_gpu >= 1, bad("experts_per_gpu", f"must be >= 1, got {self.experts_per_gpu}")),
            (self.global_batch_tokens is None or self.global_batch_tokens > 0,
             bad("global_batch_tokens", f"must be positive, got {self.global_batch_tokens}")),
            (self.lr > 0, bad("lr", f"must be positive, got {self.lr}")),
            (0 <= self.min_lr <= self.lr, bad("min_lr", f"must be in [0, lr], got {self.min_lr} (lr {self.lr})")),
            (self.warmup_steps is None or self.warmup_steps >= 0,
             bad("warmup_steps", f"must be >= 0, got {self.warmup_steps}")),
            (0 <= self.warmup_fraction < 1, bad("warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")),
            (self.decay in ("cosine", "linear"),
             InputError(f"--decay must be 'cosine' or 'linear', got {self.decay!r}")),
            (self.schedule_steps is None or self.schedule_steps >= 1,
             bad("schedule_steps", f"must be >= 1, got {self.schedule_steps}")),
            (self.schedule_start >= 0, bad("schedule_start", f"must be >= 0, got {self.schedule_start}")),
            (self.weight_decay >= 0, bad("weight_decay", f"must be >= 0, got {self.weight_decay}")),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             bad("betas", f"must be two numbers in [0, 1), got {self.betas}")),
            (self.grad_clip >= 0, bad("grad_clip", f"must be >= 0, got {self.grad_clip}")),
            (self.loss_chunks >= 1, bad("loss_chunks", f"must be >= 1, got {self.loss_chunks}")),
            (self.eval_every >= 0, bad("eval_every", f"must be >= 0, got {self.eval_every}")),
            (self.checkpoint_every >= 0, bad("checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")),
            (self.log_every >= 0, bad("log_every", f"must be >= 0, got {self.log_every}")),
            (self.eval_tokens > 0, bad("eval_tokens", f"must be positive, got {self.eval_tokens}")),
            (self.router_aux_loss_coef >= 0,
             bad("router_aux_loss_coef", f"must be >= 0, got {self.router_aux_loss_coef}")),
            (self.sdpa_backend in (None, "flash", "cudnn", "efficient", "math"),
             bad("sdpa_backend", f"must be None, flash, cudnn, efficient or math, got {self.sdpa_backend!r}")),
            (self.compile_graph in ("backbone", "whole"),
             bad("compile_graph", f"must be 'backbone' or 'whole', got {self.compile_graph!r}")),
            (self.max_steps is None or self.max_steps > 0, bad("max_steps", f"must be positive, got {self.max_steps}")),
            (self.compile_mode in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
             bad("compile_mode", "must be None, default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs, "
                                 f"got {self.compile_mode!r}")),
            (self.sharding in SHARDINGS, InputError(f"--sharding must be ddp or fsdp, got {self.sharding!r}")),
            (self.trainable in TRAINABLE, bad("trainable", f"must be all or ffn, got {self.trainable!r}")),
        ]
        for ok, error in checks:
            if not ok:
                raise error

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InputError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return cls(**d)

"""Tiny random-initialised models of every supported family (`experts.families`), each saved with a tokenizer in its
family's style (special tokens, no pad token where the family ships none), as a user's downloaded model would be."""
from __future__ import annotations

import random
from pathlib import Path

import torch

VOCAB = 300  # byte-level BPE: 256 bytes + merges + specials
HIDDEN, INTER, LAYERS, HEADS, KV, CONTEXT = 32, 64, 2, 4, 2, 128

# family → (bos, eos, pad (None: the family ships without one), unk)
SPECIALS = {
    "llama": ("<s>", "</s>", None, "<unk>"), "mistral": ("<s>", "</s>", None, "<unk>"),
    "qwen2": (None, "<|endoftext|>", "<|endoftext|>", None), "qwen3": (None, "<|endoftext|>", "<|endoftext|>", None),
    "gemma": ("<bos>", "<eos>", "<pad>", "<unk>"), "gemma2": ("<bos>", "<eos>", "<pad>", "<unk>"),
    "gemma3_text": ("<bos>", "<eos>", "<pad>", "<unk>"),
    "phi": ("<|endoftext|>", "<|endoftext|>", None, "<|endoftext|>"),
    "phi3": ("<s>", "<|endoftext|>", "<|endoftext|>", "<unk>"),
    "gpt2": ("<|endoftext|>", "<|endoftext|>", None, "<|endoftext|>"),
    "gpt_neox": ("<|endoftext|>", "<|endoftext|>", None, "<|endoftext|>"),
    "opt": ("</s>", "</s>", "<pad>", "<unk>"),
}
FAMILY_TYPES = tuple(SPECIALS)
MOE_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def family_config(model_type: str, vocab: int = VOCAB, tie: bool | None = None, context: int = CONTEXT):
    """A tiny config of `model_type` (hidden 32, 2 layers); special ids those of `family_tokenizer`."""
    from transformers import CONFIG_MAPPING

    ids = special_ids(model_type)
    common = dict(vocab_size=vocab, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    llama_like = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=context)
    kw = {
        "llama": llama_like, "mistral": {**llama_like, "sliding_window": None},
        "qwen2": llama_like, "qwen3": {**llama_like, "head_dim": 8},
        "gemma": {**llama_like, "head_dim": 8}, "gemma2": {**llama_like, "head_dim": 8},
        "gemma3_text": {**llama_like, "head_dim": 8, "sliding_window": 16},
        "phi": {**llama_like, "partial_rotary_factor": 0.5},
        "phi3": {**llama_like, "num_key_value_heads": HEADS},
        "gpt2": dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=context),
        "gpt_neox": dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, max_position_embeddings=context),
        "opt": dict(hidden_size=HIDDEN, ffn_dim=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    word_embed_proj_dim=HIDDEN, max_position_embeddings=context),
    }[model_type]
    if tie is not None:
        kw = {**kw, "tie_word_embeddings": tie}
    return CONFIG_MAPPING[model_type](**common, **kw)


def family_tokenizer(model_type: str, vocab: int = VOCAB):
    """A byte-level BPE tokenizer of `vocab` entries with the family's special tokens (and no pad token where the
    family has none), trained on random words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, unk = SPECIALS[model_type]
    specials = list(dict.fromkeys(t for t in (bos, eos, pad, unk) if t))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    words = "alpha beta gamma delta the of and patient goal recipe module".split()
    tok.train_from_iterator([" ".join(rng.choice(words) for _ in range(30)) for _ in range(200)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk)


def special_ids(model_type: str) -> dict:
    bos, eos, pad, unk = SPECIALS[model_type]
    order = list(dict.fromkeys(t for t in (bos, eos, pad, unk) if t))
    return {name: (order.index(t) if t else None) for name, t in (("bos", bos), ("eos", eos), ("pad", pad))}


def family_model(model_type: str, seed: int = 0, scale: float = 0.3, **kw):
    """A random `model_type` causal LM, with larger weights than the default init so experts differ visibly."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(model_type, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, scale)
    return model


def save_family(path: Path, model_type: str, seed: int = 0, dtype=None, bin_only: bool = False, model=None,
                **kw) -> Path:
    """Save a tiny `model_type` model (or `model`) and its family tokenizer into `path`: in `dtype` when given, as
    pytorch_model.bin only with `bin_only`."""
    model = model if model is not None else family_model(model_type, seed, **kw)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    if bin_only:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        for f in Path(path).glob("model*.safetensors*"):
            f.unlink()
        torch.save(state, Path(path) / "pytorch_model.bin")
    family_tokenizer(model_type, model.config.vocab_size).save_pretrained(path)
    return Path(path)

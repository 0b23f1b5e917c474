"""The causal-LM families a seed model may come from, and what each supports.

Every family here trains, ensembles and merges by parameters (`experts.merge`); the BTX MoE (`experts.moe`) needs
a mixture-of-experts class of transformers whose layers are the family's own with the feed-forward block replaced
by routed copies of it (same attention, biases, q/k norms, rotary embeddings):

    llama, mistral → MixtralForCausalLM   (Jiang et al. 2024; BTX, Sukhbaatar et al. 2024, used Llama → Mixtral)
    qwen2          → Qwen2MoeForCausalLM  (attention biases; its shared expert left empty, size 0)
    qwen3          → Qwen3MoeForCausalLM  (q/k norms, attention_bias as the seed's)

The other families (Gemma 1-3, Phi, Phi-3, GPT-2, GPT-NeoX, OPT) have no such class in transformers (PhiMoE's
layers are not Phi-3's, OLMoE's not OLMo's), so their runs skip the MoE. `FAMILIES` maps config.model_type to
the family's name; `check_seed` refuses, in one line, a seed of another family or whose tokenizer does not fit
its embeddings.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from corpus.io import InputError


@dataclass(frozen=True)
class Family:
    """A model family: its name as users know it, and the transformers MoE model_type its experts merge into
    (None: no BTX MoE, `moe_reason` says why)."""

    name: str
    moe: str | None = None
    moe_reason: str = ""


_NO_MOE = "transformers has no mixture-of-experts class with {name}'s layers"
FAMILIES: dict[str, Family] = {  # config.model_type → family
    "llama": Family("Llama", "mixtral"),
    "mistral": Family("Mistral", "mixtral"),
    "qwen2": Family("Qwen2", "qwen2_moe"),
    "qwen3": Family("Qwen3", "qwen3_moe"),
    **{t: Family(n, None, _NO_MOE.format(name=n)) for t, n in (
        ("gemma", "Gemma"), ("gemma2", "Gemma 2"), ("gemma3_text", "Gemma 3"), ("phi", "Phi"), ("phi3", "Phi-3"),
        ("gpt2", "GPT-2"), ("gpt_neox", "GPT-NeoX"), ("opt", "OPT"))},
}


def family_names() -> str:
    """'Llama (llama), Mistral (mistral), ...': the families that work, for messages."""
    return ", ".join(f"{f.name} ({t})" for t, f in FAMILIES.items())


def get_family(model_type: str, where: str = "the seed model") -> Family:
    """The family of `model_type`; InputError naming the families that work otherwise."""
    if model_type not in FAMILIES:
        raise InputError(f"{where} is a {model_type!r} model, a family this pipeline does not support; "
                         f"supported families: {family_names()}")
    return FAMILIES[model_type]


def moe_support(model_type: str) -> tuple[str | None, str]:
    """(the MoE model_type the BTX merge builds from `model_type`, or None; why not, when None)."""
    fam = FAMILIES.get(model_type)
    if fam is None:
        return None, f"{model_type!r} is not a supported family"
    return fam.moe, fam.moe_reason


@functools.lru_cache(maxsize=16)
def seed_config(seed_model: str):
    """The transformers config of `seed_model` ('scratch' → the Llama the pipeline builds), read through AutoConfig
    so that attribute maps apply (GPT-2's n_positions is config.max_position_embeddings)."""
    from transformers import AutoConfig, LlamaConfig

    if seed_model == "scratch":
        return LlamaConfig()
    try:
        return AutoConfig.from_pretrained(str(Path(seed_model).expanduser()) if Path(seed_model).expanduser().exists()
                                          else seed_model)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise InputError(f"--seed-model {seed_model}: cannot read its config: {first}") from None


def seed_model_type(seed_model: str) -> str:
    """config.model_type of `seed_model` ('scratch' is a Llama: no transformers import while a graph is built)."""
    return "llama" if seed_model == "scratch" else seed_config(seed_model).model_type


def context_length(config) -> int | None:
    """The model's context in tokens: config.max_position_embeddings through the config's attribute map
    (n_positions for GPT-2); None when the config has none."""
    v = getattr(config, "max_position_embeddings", None)
    return int(v) if v else None


def folder_context_length(folder: str | os.PathLike, default: int = 1024) -> int:
    """`context_length` of the model saved in `folder` (config.json read through AutoConfig), else `default`."""
    from transformers import AutoConfig

    try:
        return context_length(AutoConfig.from_pretrained(str(folder))) or default
    except Exception:  # noqa: BLE001 - a folder without a loadable config: the default
        return default


@functools.lru_cache(maxsize=16)
def check_seed(seed_model: str) -> str:
    """Before any work: the seed's family is supported and its tokenizer's ids fit its embeddings (one line naming
    both sizes otherwise). Returns the model_type. 'scratch' is a Llama with its own tokenizer."""
    if seed_model == "scratch":
        return "llama"
    config = seed_config(seed_model)
    get_family(config.model_type, f"--seed-model {seed_model}")
    from experts.tokenizer import load_tokenizer

    n_tok = len(load_tokenizer(str(Path(seed_model).expanduser()) if Path(seed_model).expanduser().exists()
                               else seed_model))
    n_embed = getattr(config, "vocab_size", None)
    if n_embed is not None and n_tok > n_embed:
        raise InputError(f"--seed-model {seed_model}: its tokenizer has {n_tok} tokens but its embeddings only "
                         f"{n_embed} rows (config vocab_size); give the folder the tokenizer the model was trained with")
    return config.model_type

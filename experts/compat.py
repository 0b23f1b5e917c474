"""Saved model folders that load on older transformers too: what the files need, and the fix-up that makes them so.

transformers 5 writes files that transformers 4.x misreads or rejects:

  tokenizer_config.json  "tokenizer_class": "TokenizersBackend"  (4.x: "does not exist")  → PreTrainedTokenizerFast
                         no "clean_up_tokenization_spaces"        (4.x defaults to True: "a , b" decodes as "a, b")
                         model_max_length from the tokenizer       → the model's max_position_embeddings
  config.json            only "rope_parameters"                    (4.x ignores it and takes its default rope_theta,
                                                                    1e6 for Mixtral) → also "rope_theta"
                                                                    (+ "rope_scaling")
                         "dtype"                                   → also "torch_dtype"
                         "use_cache": false (set for training)     → true, so generation uses the KV cache
  generation_config.json "use_cache": false                        → true

and one field that must not travel from a seed to what is trained from it:

  config.json, tokenizer_config.json  "auto_map" naming code the folder does not hold (a seed's `evil.py`, a hub
                                      repo's module) → dropped; `trust_remote_code=True` would otherwise look for
                                      it. An ensemble folder keeps the auto_map of the shims it holds.

`make_portable(folder)` rewrites those fields in place after `save_pretrained`; transformers 5 reads the patched
files exactly as before (tested in tests/experts/test_compat.py, which also loads them with MIN_TRANSFORMERS).
"""
from __future__ import annotations

import os
from pathlib import Path

from corpus.io import read_json, write_json

# The oldest transformers that loads every folder a run saves (configs, tokenizers, Llama and Mixtral weights)
# with the same outputs as the version that wrote them; checked by tests/experts/test_compat.py.
MIN_TRANSFORMERS = "4.45.0"
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def make_portable(folder: str | os.PathLike, max_length: int | None = None) -> list[str]:
    """Rewrite config.json, generation_config.json and tokenizer_config.json of a `save_pretrained` folder (those
    present) so MIN_TRANSFORMERS and later load them identically. The tokenizer's model_max_length becomes
    `max_length`, or the config's max_position_embeddings. Returns the names of the files changed."""
    folder = Path(folder)
    changed = []
    config_file = folder / "config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    if config and "model_type" in config:
        new = own_code_only(portable_config(config), folder)
        if new != config:
            write_json(config_file, new)
            changed.append(config_file.name)
    gen_file = folder / "generation_config.json"
    if gen_file.is_file():
        gen = read_json(gen_file)
        if gen.get("use_cache") is False:
            write_json(gen_file, {**gen, "use_cache": True})
            changed.append(gen_file.name)
    tok_file = folder / "tokenizer_config.json"
    if tok_file.is_file():
        tok = read_json(tok_file)
        new = own_code_only(portable_tokenizer_config(tok, max_length or _context(config),
                                                      fast=(folder / "tokenizer.json").is_file()), folder)
        if new != tok:
            write_json(tok_file, new)
            changed.append(tok_file.name)
    return changed


def own_code_only(config: dict, folder: str | os.PathLike) -> dict:
    """`config` without the `auto_map` entries whose code `folder` does not hold (`module.Class` needs
    `folder/module.py`; a `repo--module.Class` reference is never kept); without `auto_map` when none is left."""
    auto_map = config.get("auto_map")
    if auto_map is None:
        return config

    def held(ref) -> bool:
        if ref is None:  # AutoTokenizer's [slow, fast] pair may leave one out
            return True
        return isinstance(ref, str) and "--" not in ref and "." in ref and \
            (Path(folder) / f"{ref.rsplit('.', 1)[0]}.py").is_file()

    kept = {k: v for k, v in auto_map.items() if all(held(r) for r in (v if isinstance(v, (list, tuple)) else [v]))} \
        if isinstance(auto_map, dict) else {}
    out = {k: v for k, v in config.items() if k != "auto_map"}
    if kept:
        out["auto_map"] = kept
    return out


def _context(config: dict) -> int | None:
    """The context length in a config.json dict, under the name its config class maps max_position_embeddings to
    (GPT-2: n_positions)."""
    try:
        from transformers import CONFIG_MAPPING

        key = CONFIG_MAPPING[config["model_type"]].attribute_map.get("max_position_embeddings", "max_position_embeddings")
    except (KeyError, ImportError):
        key = "max_position_embeddings"
    return config.get(key) or config.get("max_position_embeddings")


def portable_config(config: dict) -> dict:
    """config.json fields with their transformers-4 spellings added beside the transformers-5 ones."""
    out = dict(config)
    if out.get("use_cache") is False:
        out["use_cache"] = True
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:  # one rope for all layers (not per layer type)
        out.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            out.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    if "dtype" in out and "torch_dtype" not in out:
        out["torch_dtype"] = out["dtype"]
    return out


def portable_tokenizer_config(tok: dict, max_length: int | None, fast: bool = True) -> dict:
    """tokenizer_config.json with a class every transformers knows, no decode clean-up, and the model's length.
    `fast`: the folder has a tokenizer.json (what PreTrainedTokenizerFast loads)."""
    out = dict(tok)
    if fast and out.get("tokenizer_class") == "TokenizersBackend":
        out["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    out.setdefault("clean_up_tokenization_spaces", False)
    if max_length:
        out["model_max_length"] = int(max_length)
    return out

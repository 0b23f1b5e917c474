"""What every merge of expert checkpoints reads and writes (`experts.merge`'s parameter merges, `experts.moe`'s BTX
MoE): `CheckpointReader` reads the tensors of a `save_pretrained` folder one at a time (memory-mapped safetensors);
`check_expert_dirs` refuses experts of different architectures or tokenizers; `fill_meta_model` loads a merged
state into a model built on the meta device; `save_merged_model` writes a merged model atomically.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from corpus.io import InputError, atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

# config fields that must agree for two checkpoints to be averaged / merged
STRUCTURAL_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def check_expert_dirs(expert_dirs: Sequence[str | os.PathLike]) -> list[dict]:
    """Configs of the experts; InputError (naming the field and both directories) unless they all agree."""
    if len(expert_dirs) == 0:
        raise InputError("no expert directories given")
    configs = []
    for d in expert_dirs:
        d = Path(d)
        if not d.is_dir():
            raise InputError(f"expert directory does not exist: {d}")
        if not (d / "config.json").is_file():
            raise InputError(f"not a Hugging Face model directory (no config.json): {d}")
        configs.append(read_json(d / "config.json"))
    for d, cfg in zip(expert_dirs[1:], configs[1:]):
        for f in STRUCTURAL_FIELDS:
            if cfg.get(f) != configs[0].get(f):
                raise InputError(f"experts differ in {f}: {configs[0].get(f)!r} in {expert_dirs[0]} vs {cfg.get(f)!r} in {d}")
        if (cfg.get("architectures") or [None])[0] != (configs[0].get("architectures") or [None])[0]:
            raise InputError(f"experts differ in architecture: {configs[0].get('architectures')} in {expert_dirs[0]} "
                             f"vs {cfg.get('architectures')} in {d}")
    _check_tokenizers(expert_dirs)
    return configs


def _check_tokenizers(expert_dirs) -> None:
    vocab0 = _tokenizer_vocab(expert_dirs[0])
    for d in expert_dirs[1:]:
        v = _tokenizer_vocab(d)
        if vocab0 is not None and v is not None and v != vocab0:
            raise InputError(f"experts have different tokenizers: {expert_dirs[0]} and {d} map tokens to different ids")


def _tokenizer_vocab(d) -> dict | None:
    f = Path(d) / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        model = json.loads(f.read_text())["model"]
        return model.get("vocab")
    except (OSError, ValueError, KeyError):
        raise InputError(f"corrupt tokenizer.json in {d}") from None


class CheckpointReader:
    """Tensors of one `save_pretrained` directory, read lazily (safetensors, sharded or not; else pytorch_model.bin,
    sharded or not, loaded with weights_only), under the names the model class gives them.

    Files keep the names their writer used (GPT-NeoX's `embed_out`, which transformers 5 loads as `lm_head`; keys
    with or without the base-model prefix). `keys()` are the model's own state-dict names: each file key goes
    through the renamings transformers applies on load (`conversion_mapping`), and file keys that the model does
    not have (stale buffers) are dropped. Where loading would combine several file tensors into one (a
    `WeightConverter`), the whole model is loaded through `from_pretrained` instead and its state dict read."""

    def __init__(self, d: str | os.PathLike):
        self.dir = Path(d)
        self._files: dict[str, object] = {}
        self._state: dict[str, torch.Tensor] = {}
        raw = self._file_keys()  # file key → file name ("" = in self._state)
        self.where: dict[str, str] = {}  # model key → file name
        self._raw: dict[str, str] = {}  # model key → file key
        mapping = _model_key_mapping(self.dir, list(raw))
        if mapping is None:  # a conversion beyond renaming: read the tensors through the model itself
            self._state = _state_through_model(self.dir)
            self.where = {k: "" for k in self._state}
            self._raw = {k: k for k in self._state}
            return
        for key, name in raw.items():
            new = mapping.get(key, key)
            if new is not None:
                self.where[new], self._raw[new] = name, key

    def _file_keys(self) -> dict[str, str]:
        from safetensors import safe_open

        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            return dict(read_json(index)["weight_map"])
        if single.is_file():
            try:
                with safe_open(single, "pt") as f:
                    return {k: "model.safetensors" for k in f.keys()}
            except Exception as e:  # noqa: BLE001
                raise InputError(f"corrupt checkpoint file {single}: {str(e).splitlines()[0][:200]}") from None
        bins = [self.dir / "pytorch_model.bin"] if (self.dir / "pytorch_model.bin").is_file() else []
        if (self.dir / "pytorch_model.bin.index.json").is_file():
            files = sorted(set(read_json(self.dir / "pytorch_model.bin.index.json")["weight_map"].values()))
            bins = [self.dir / f for f in files]
        if not bins:
            raise InputError(f"no model weights (model.safetensors / pytorch_model.bin) in {self.dir}")
        for b in bins:
            try:
                self._state.update(torch.load(b, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:  # noqa: BLE001
                raise InputError(f"corrupt checkpoint file {b}: {str(e).splitlines()[0][:200]}") from None
        return {k: "" for k in self._state}

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> torch.Tensor:
        name, raw = self.where[key], self._raw[key]
        if name == "":
            return self._state[raw]
        return self._file(name).get_tensor(raw)

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, read from the file header (no data)."""
        name, raw = self.where[key], self._raw[key]
        if name == "":
            return tuple(self._state[raw].shape)
        return tuple(self._file(name).get_slice(raw).get_shape())

    def _file(self, name: str):
        from safetensors import safe_open

        if name not in self._files:
            try:
                self._files[name] = safe_open(self.dir / name, "pt")
            except Exception as e:  # noqa: BLE001
                raise InputError(f"corrupt checkpoint file {self.dir / name}: {str(e).splitlines()[0][:200]}") from None
        return self._files[name]


def _meta_model(folder: Path):
    """The model class of `folder`'s config.json, built on the meta device (no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _model_key_mapping(folder: Path, file_keys: list[str]) -> dict[str, str | None] | None:
    """{file key: the model's name for it, or None for a key the model does not have}, with transformers' own
    load-time renamings (`transformers.conversion_mapping`, transformers ≥ 5; identity before); None when a key
    needs a conversion beyond renaming."""
    try:
        model = _meta_model(folder)
    except Exception:  # noqa: BLE001 - not a config transformers can build: take the file's names as they are
        return {k: k for k in file_keys}
    model_keys = model.state_dict()
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: names on disk are the model's
        renamings, converters = [], []
    else:
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    out: dict[str, str | None] = {}
    prefix = model.base_model_prefix
    for key in file_keys:
        if renamings or converters:
            new, converted = rename_source_key(key, renamings, converters, prefix, model_keys)
            if converted is not None:
                return None
        else:
            new = key
            if new not in model_keys and f"{prefix}.{new}" in model_keys:
                new = f"{prefix}.{new}"
            elif new not in model_keys and new.startswith(prefix + ".") and new[len(prefix) + 1:] in model_keys:
                new = new[len(prefix) + 1:]
        out[key] = new if new in model_keys else None
    return out


def _state_through_model(folder: Path) -> dict[str, torch.Tensor]:
    from experts.model import load_causal_lm

    model = load_causal_lm(folder, load_tokenizer=False)[0]
    return {k: v.detach() for k, v in model.state_dict().items()}


def fill_meta_model(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into a model built on the meta device; tie weights; refuse anything left unfilled."""
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise InputError(f"{source} has parameters the target model does not have: {unexpected[:3]}")
    if any(p.is_meta for p in model.parameters()):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise InputError(f"{source} lacks parameters {still_meta[:3]} of the target model")


def save_merged_model(model, tokenizer_dir, out_dir, meta_name: str, meta: dict) -> Path:
    """`save_pretrained` the model, the tokenizer of `tokenizer_dir` and `meta_name` (JSON) into out_dir, atomically."""
    from transformers import AutoTokenizer

    from experts.compat import make_portable

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
        except Exception as e:  # noqa: BLE001
            log.warning("no tokenizer copied from %s: %s", tokenizer_dir, e)
        make_portable(tmp)
        write_json(tmp / meta_name, meta)
    return out_dir

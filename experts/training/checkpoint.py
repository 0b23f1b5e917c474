"""Resumable training state: every `TrainConfig.checkpoint_every` steps the loop writes the full state (weights,
AdamW moments, step and schedule, RNG states, data position, loss history) atomically to `<out_dir>.ckpt/` as
safetensors + JSON (no pickle); calling `train_model` again with the same arguments continues from there, and on
CPU the loss curve and final weights equal those of an uninterrupted run bit for bit. The folder is removed once
`out_dir` is complete. Under FSDP the files hold the same full (unsharded) tensors, gathered to rank 0.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from corpus.io import InputError, atomic_dir, read_json, write_json


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    """Where resumable state of `out_dir` lives while training: `<out_dir>.ckpt/`."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.ckpt"


def full_state(model, optimizer=None, fsdp: bool = False) -> tuple[dict, dict | None]:
    """(model state dict, optimizer state dict) with whole CPU tensors.

    Plain/DDP: `state_dict()`, optimizer state keyed by parameter index. FSDP: gathered from the shards with
    `torch.distributed.checkpoint.state_dict` (full_state_dict, cpu_offload) and keyed by parameter name; a
    collective that every rank must call, of which only rank 0 gets the tensors (the others get empty dicts).
    """
    if not fsdp:
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else None
    # FSDP's state-dict API: slow to import, and only needed here
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for tied in names.values():  # tied weights (embeddings = lm_head) share one tensor, as in state_dict()
        for name in tied[1:]:
            if tied[0] in model_state and name in model_state:
                model_state[name] = model_state[tied[0]]
    return model_state, get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None


def tied_like(reference: dict, weights: dict) -> dict:
    """`weights` with the names that share one tensor in `reference` (tied embeddings) sharing one again."""
    first: dict[int, str] = {}
    out = dict(weights)
    for name, t in reference.items():
        key = t.data_ptr()
        if key in first and name in out:
            out[name] = out[first[key]]
        first.setdefault(key, name)
    return out


def save_checkpoint(path: Path, model, optimizer, state: dict, fsdp: bool = False, best: dict | None = None) -> None:
    """Write `path/` (model.safetensors, optimizer.safetensors, rng.safetensors, trainer_state.json, and
    best.safetensors = the `best` weights of the overfitting guard when given) atomically.

    Under FSDP every rank calls this (the full state is gathered, `full_state`) and rank 0 writes the same
    files as a single process would, except that the optimizer's state is keyed by parameter name
    ("optimizer_keys": "names") instead of index; a resume must then use FSDP again (any world size).
    """
    model_state, opt = full_state(model, optimizer, fsdp)
    if fsdp and torch.distributed.get_rank() != 0:
        return
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        if best is not None:
            save_file({k: v.clone().contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
        tensors, scalars = {}, {}
        for pid, st in opt["state"].items():
            for name, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{pid}.{name}"] = v.detach().cpu().clone().contiguous()
                else:
                    scalars[f"{pid}.{name}"] = v
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["torch_cuda"] = torch.cuda.get_rng_state()  # this process's GPU only: others are not touched
        save_file(rng, str(tmp / "rng.safetensors"))
        np_state = np.random.get_state()
        py_state = random.getstate()
        write_json(tmp / "trainer_state.json", {
            **state,
            "optimizer_keys": "names" if fsdp else "ids",
            "optimizer_param_groups": opt["param_groups"],
            "optimizer_scalars": scalars,
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        })


def load_checkpoint(path: Path, model, optimizer, device, fsdp: bool = False) -> dict:
    """Restore model, optimizer and RNG states from `save_checkpoint`'s folder; return the trainer state.

    Under FSDP every rank reads the whole files and keeps its own shards (`set_model_state_dict` /
    `set_optimizer_state_dict` with full_state_dict).
    """
    # FSDP's state-dict API (slow to import): only when a checkpoint is read
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    def corrupt(e: BaseException) -> InputError:
        return InputError(f"corrupt training checkpoint {path} ({str(e).splitlines()[0]}); delete it to restart")

    try:
        state = read_json(path / "trainer_state.json")
    except (OSError, InputError) as e:
        raise corrupt(e) from None
    keys = state.pop("optimizer_keys", "ids")
    if keys != ("names" if fsdp else "ids"):
        raise InputError(f"training checkpoint {path} was written with --sharding {'fsdp' if keys == 'names' else 'ddp'}; "
                         "resume with the same --sharding, or delete it to restart")
    try:
        weights = load_file(str(path / "model.safetensors"), device="cpu" if fsdp else str(device))
        if fsdp:
            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(weights)
        tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, RuntimeError, KeyError) as e:
        raise corrupt(e) from None
    opt_state: dict[int | str, dict] = {}
    for key, v in [*tensors.items(), *state.pop("optimizer_scalars").items()]:
        pid, name = key.rsplit(".", 1)  # "<index>.<name>" or, under FSDP, "<parameter name>.<name>"
        opt_state.setdefault(int(pid) if pid.isdigit() else pid, {})[name] = v
    opt_sd = {"state": opt_state, "param_groups": state.pop("optimizer_param_groups")}
    if fsdp:
        set_optimizer_state_dict(model, optimizer, opt_sd, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(opt_sd)
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    npr = state.pop("numpy_rng")
    np.random.set_state((npr[0], np.asarray(npr[1], dtype=np.uint32), *npr[2:]))
    pyr = state.pop("python_rng")
    random.setstate((pyr[0], tuple(pyr[1]), pyr[2]))
    return state

"""The ensemble folder's own file, `ensemble.json`: writing it, checking a folder, and loading the ensemble it names.

    ensemble.json   kind ('sparse': c-BTM `SparseEnsemble` | 'posterior': BTM `PosteriorEnsemble`), name (the run's
                    model name, e.g. ensemble_top2), experts (folders, relative to the ensemble folder);
                    sparse: centroids (.npy), embedder (folder), top_k, temperature, route_every, route_early,
                    route_weights, prior_weights (k,) or null;  posterior: prior, prior_weights, alpha, top_k

`save_ensemble_config` writes it (inputs are checked then, not at load), `check_ensemble_folder` checks that what it
names is there, and `load_ensemble` builds the ensemble. The files that make the folder a Hugging Face model too
(config.json, tokenizer, the router placed inside) are `experts.hf_ensemble`'s.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from clustering.router import ROUTE_EVERY, ROUTE_WEIGHTS, TEMPERATURE, TOP_K, CentroidRouter, check_top_k
from corpus.io import InputError, load_array, read_json, write_json
from corpus.layout import ENSEMBLE_CONFIG
from experts.ensemble import (
    ALPHA, PosteriorEnsemble, RoutingSchedule, SparseEnsemble, check_prior_kind, check_prior_weights,
    check_route_weights, check_vocabularies,
)
from experts.scoring import ScoringModel

PATH_KEYS = ("centroids", "embedder")  # ensemble.json entries that name files beside the experts


def resolve(base: Path, p: str) -> Path:
    """A path of ensemble.json (relative to its folder `base`, or absolute) as an absolute path."""
    q = Path(p)
    return q if q.is_absolute() else (base / q).resolve()


def relative(target, base: Path) -> str:
    """`target` relative to `base`, as ensemble.json stores it (absolute across drives)."""
    try:
        return os.path.relpath(Path(target).resolve(), Path(base).resolve())
    except ValueError:  # another drive
        return str(Path(target).resolve())


def expert_dirs(folder: Path, cfg: dict) -> list[Path]:
    """The expert folders that the ensemble.json `cfg` of `folder` names, in cluster order."""
    return [resolve(folder, e) for e in cfg.get("experts", [])]


def save_ensemble_config(
    out_dir: str | os.PathLike,
    expert_dirs: Sequence[str | os.PathLike],
    kind: str = "sparse",
    centroids_path: str | os.PathLike | None = None,
    embedder_dir: str | os.PathLike | None = None,
    top_k: int = TOP_K,
    temperature: float = TEMPERATURE,
    route_every: int = ROUTE_EVERY,
    prior: str = "updating",
    prior_weights: Sequence[float] | None = None,
    alpha: float = ALPHA,
    name: str | None = None,
    route_early: Sequence[int] = (),
    route_weights: str = ROUTE_WEIGHTS[0],
) -> Path:
    """Write `out_dir/ensemble.json` atomically and return its path.

    kind="sparse": expert dirs, centroids .npy path, embedder dir, top_k, temperature, route_every, route_early,
    route_weights, prior_weights (k,) or null (the routing prior of `SparseEnsemble`; null = uniform).
    kind="posterior": expert dirs, prior ("cached"|"updating"), prior_weights (k,) or null, alpha, top_k.
    Paths are stored relative to `out_dir` so a run folder can move. Inputs are checked now, not at load.
    """
    out_dir = Path(out_dir)
    for d in expert_dirs:
        if not (Path(d) / "config.json").is_file():
            raise InputError(f"expert directory missing or not a model directory (no config.json): {d}")
    k = len(expert_dirs)
    cfg: dict = {"kind": kind, "name": name or kind, "experts": [relative(d, out_dir) for d in expert_dirs]}
    if kind == "sparse":
        if centroids_path is None or embedder_dir is None:
            raise InputError("a sparse ensemble config needs centroids_path and embedder_dir")
        if not Path(centroids_path).is_file():
            raise InputError(f"centroids file missing: {centroids_path}")
        centroids = load_array(centroids_path, mmap_mode="r")  # (k, d)
        if centroids.shape[0] != k:
            raise InputError(f"{centroids_path} has {centroids.shape[0]} centroids but {k} experts were given")
        router = CentroidRouter(None, centroids, temperature, top_k)
        check_route_weights(route_weights)
        schedule = RoutingSchedule(route_every, route_early)
        cfg.update(centroids=relative(centroids_path, out_dir), embedder=relative(embedder_dir, out_dir),
                   top_k=router.top_k, temperature=router.temperature, route_every=schedule.every,
                   route_early=list(schedule.early), route_weights=route_weights,
                   prior_weights=None if prior_weights is None else check_prior_weights(prior_weights, k))
    elif kind == "posterior":
        check_prior_kind(prior)
        cfg.update(prior=prior, prior_weights=None if prior_weights is None else [float(x) for x in prior_weights],
                   alpha=float(alpha), top_k=check_top_k(top_k, k))
    else:
        raise InputError(f"unknown ensemble kind {kind!r}; use 'sparse' or 'posterior'")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / ENSEMBLE_CONFIG, cfg)
    return out_dir / ENSEMBLE_CONFIG


def check_ensemble_folder(folder: str | os.PathLike) -> dict:
    """ensemble.json of `folder`, after checking that every expert folder exists and that the experts share one
    vocabulary size; InputError (one line naming the folder) otherwise."""
    folder = Path(folder)
    if not (folder / ENSEMBLE_CONFIG).is_file():
        raise InputError(f"{folder} is not an ensemble folder (no {ENSEMBLE_CONFIG})")
    cfg = read_json(folder / ENSEMBLE_CONFIG)
    experts = expert_dirs(folder, cfg)
    if not experts:
        raise InputError(f"{folder / ENSEMBLE_CONFIG} lists no experts")
    sizes = []
    for name, d in zip(cfg["experts"], experts):
        if not (d / "config.json").is_file():
            raise InputError(f"expert folder {d} (\"{name}\" in {folder / ENSEMBLE_CONFIG}) is missing: copy the whole "
                             "run folder, or save the ensemble with copy_experts=True")
        sizes.append(read_json(d / "config.json").get("vocab_size"))
    check_vocabularies(experts, sizes, owner=f"experts of {folder}")
    for key in PATH_KEYS:
        if key in cfg and not resolve(folder, cfg[key]).exists():
            raise InputError(f"{key} {resolve(folder, cfg[key])} named in {folder / ENSEMBLE_CONFIG} is missing")
    return cfg


def load_ensemble(path: str | os.PathLike, **kw) -> ScoringModel:
    """SparseEnsemble or PosteriorEnsemble from an `ensemble.json` (or its folder), by its "kind". Keyword arguments
    go to the ensemble (device, devices, offload, dtype, max_length, expert_batch_size, ...) and override the
    routing options of the file. Sparse configs written before the routing options existed load with the routing
    they were written for (`route_weights="distance"`, no early refresh, uniform prior)."""
    path = Path(path)
    file = path / ENSEMBLE_CONFIG if path.is_dir() else path
    cfg = read_json(file)
    build = {"sparse": _sparse, "posterior": _posterior}.get(cfg.get("kind"))
    if build is None:
        raise InputError(f"{path}: unknown ensemble kind {cfg.get('kind')!r}")
    return build(cfg, file.parent, **kw)


def _sparse(cfg: dict, base: Path, device="cpu", devices=None, offload=False, **kw) -> SparseEnsemble:
    from clustering.embed import load_embedder

    centroids_path = resolve(base, cfg["centroids"])
    if not centroids_path.is_file():
        raise InputError(f"centroids file missing: {centroids_path} (named in {base / ENSEMBLE_CONFIG})")
    options = {"top_k": cfg["top_k"], "temperature": cfg["temperature"], "route_every": cfg["route_every"],
               "route_early": cfg.get("route_early", ()), "route_weights": cfg.get("route_weights", "distance"),
               "prior": cfg.get("prior_weights"), "name": cfg.get("name", "ensemble")}
    options.update(kw)
    return SparseEnsemble([resolve(base, e) for e in cfg["experts"]], load_array(centroids_path),
                          load_embedder(resolve(base, cfg["embedder"])), device=device, devices=devices,
                          offload=offload, **options)


def _posterior(cfg: dict, base: Path, device="cpu", devices=None, offload=False, **kw) -> PosteriorEnsemble:
    return PosteriorEnsemble([resolve(base, e) for e in cfg["experts"]], prior=cfg["prior"], top_k=cfg["top_k"],
                             prior_weights=cfg.get("prior_weights"), alpha=cfg.get("alpha", ALPHA), device=device,
                             devices=devices, offload=offload, name=cfg.get("name", "posterior"), **kw)

"""c-BTM and BTM ensembles as Hugging Face models: `AutoModelForCausalLM.from_pretrained(<ensemble folder>)`; and
pushing any model folder of a run to the Hugging Face Hub (`push_folder`).

An ensemble folder (written by `write_hf_ensemble` after `experts.ensemble_folder.save_ensemble_config`):

    config.json              model_type "cbtm_ensemble", auto_map (trust_remote_code users), vocab, special ids
    ensemble.json            what `experts.ensemble_folder.load_ensemble` reads: kind, experts, routing parameters
    centroids.npy, embedder/ the router (c-BTM only), inside the folder
    tokenizer files          the experts' shared tokenizer (AutoTokenizer.from_pretrained(folder))
    generation_config.json, configuration_cbtm_ensemble.py, modeling_cbtm_ensemble.py (remote-code shims)

Experts are referenced by paths relative to the folder (`../../experts-<h>/cluster_000`: copying the whole run
folder keeps them valid) or copied inside under their model names (`experts/expert_000/`, `copy_experts=True`,
what `push_to_hub` does).

`CBTMEnsembleForCausalLM.forward` returns the mixture's log-probabilities as `logits` (B, T, V):
logits[b, t] = log Σ_j w_j · p_j(· | x_≤t) (softmax of them is the mixture itself, so temperature, top-p and the
other logits processors of HF `generate` act on the ensemble's distribution). Only the routed experts run. Inside
`generate` each row decodes as `ScoringModel.generate` does (routing from the prompt, refreshed every route_every
generated tokens, one KV cache per routed expert), so greedy HF generation equals the project's; a plain forward
scores like `ScoringModel.score_tokens` (routing points 1, 1 + R, ...). Importing `experts` registers the model
type with transformers' Auto classes (`register`; experts/__init__.py says why at import).

`push_folder(folder, repo_id)` uploads a folder as it is (card, weights, tokenizer, training.json); an ensemble folder
is first exported self-contained (its experts copied in); `dry_run=True` returns the files that would be uploaded
without contacting the hub.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from corpus.io import InputError, read_json, write_json
from corpus.layout import CENTROIDS, ENSEMBLE_CONFIG, STAGE_STAMP
from experts.ensemble_folder import PATH_KEYS, check_ensemble_folder, expert_dirs, load_ensemble, relative, resolve
from experts.families import folder_context_length
from experts.run_models import expert_name

MODEL_TYPE = "cbtm_ensemble"
SHIMS = {  # remote-code modules written into each folder: the implementation stays in the installed package
    "configuration_cbtm_ensemble.py": "CBTMEnsembleConfig",
    "modeling_cbtm_ensemble.py": "CBTMEnsembleForCausalLM",
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# pipeline stamps (local paths, host names) and hidden files stay home
UPLOAD_IGNORE = ["stage.json", "*/stage.json", "*.stage.json", ".*", "*/.*"]


class CBTMEnsembleConfig(PretrainedConfig):
    """config.json of an ensemble folder: ensemble_kind ('sparse' c-BTM | 'posterior' BTM), ensemble_name (the
    run's model name, e.g. ensemble_top2), num_experts, routing_top_k (experts mixed per prefix), vocab_size,
    max_position_embeddings and the special token ids (those of the experts). The routing parameters live in
    ensemble.json."""

    model_type = MODEL_TYPE


class CBTMEnsembleForCausalLM(PreTrainedModel, GenerationMixin):
    """A `ScoringModel` ensemble (`experts.ensemble`) behind the transformers causal-LM interface (inference only).

    `from_pretrained(folder, device=..., dtype=..., offload=..., expert_batch_size=...)` loads it (experts lazily,
    on first use); `save_pretrained(dst, copy_experts=False)` writes a folder that references (or, with
    copy_experts, contains) the experts; `push_to_hub` uploads a self-contained copy with its card.
    """

    config_class = CBTMEnsembleConfig
    base_model_prefix = "ensemble"
    main_input_name = "input_ids"
    _no_split_modules: list[str] = []
    _supports_cache_class = False

    def __init__(self, config: CBTMEnsembleConfig, ensemble=None, folder: str | os.PathLike | None = None):
        super().__init__(config)
        self.ensemble = ensemble  # experts.ensemble.SparseEnsemble | PosteriorEnsemble
        self.folder = Path(folder) if folder is not None else None
        self._load_kw: dict = {}
        self._decoding: dict | None = None  # prefix ids → [(offset, prompt_len, state)] while `generate` runs
        self.post_init()

    # ---- loading and saving ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, device=None, device_map=None,
                        dtype=None, torch_dtype=None, offload: bool = False, expert_batch_size: int | None = None,
                        **kwargs):
        """Load an ensemble folder (or a hub repo pushed by `push_to_hub`). device: 'cpu', 'cuda', 'cuda:1', or
        None (device_map when it names one device, else CUDA when available); dtype: the experts' weights."""
        folder = _local_folder(pretrained_model_name_or_path, kwargs)
        cfg = check_ensemble_folder(folder)
        if not isinstance(config, CBTMEnsembleConfig):
            config = folder_config(folder, cfg)
        if device is None:
            device = device_map if isinstance(device_map, (str, torch.device)) and device_map != "auto" else None
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = dtype if dtype is not None else torch_dtype
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        load_kw = {"dtype": dtype, "offload": offload, "expert_batch_size": expert_batch_size}
        ensemble = load_ensemble(folder, device=device, **load_kw)
        model = cls(config, ensemble=ensemble, folder=folder)
        model._load_kw = load_kw
        model.name_or_path = str(folder)
        model.config.name_or_path = str(folder)
        gen = Path(folder) / "generation_config.json"
        if gen.is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        return model.eval()

    def save_pretrained(self, save_directory, copy_experts: bool = False, **kwargs) -> None:
        """Write an ensemble folder at `save_directory` (its card too): experts referenced by relative paths, or
        copied inside with copy_experts=True. Other transformers options (shards, safetensors) do not apply."""
        if self.folder is None:
            raise InputError("this ensemble was not loaded from a folder; write one with experts.ensemble_folder."
                             "save_ensemble_config and experts.hf_ensemble.write_hf_ensemble")
        export_ensemble(self.folder, save_directory, copy_experts=copy_experts)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token=None, commit_message: str | None = None,
                    **kwargs):
        """Upload a self-contained copy (experts copied in, card included) with `push_folder`."""
        if self.folder is None:
            raise InputError("this ensemble was not loaded from a folder; nothing to push")
        return push_folder(self.folder, repo_id, private=private, token=token, commit_message=commit_message)

    # ---- device --------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.ensemble.device if self.ensemble is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # the log-probabilities it returns

    def to(self, *args, **kwargs):
        """Move to a device by reloading the ensemble there (experts load lazily); dtypes are chosen at load."""
        device = kwargs.get("device") or next((a for a in args if isinstance(a, (str, torch.device))), None)
        if device is None or self.folder is None or torch.device(device) == self.device:
            return self
        self.ensemble = load_ensemble(self.folder, device=device, **self._load_kw)
        return self

    def cuda(self, device=None):
        return self.to(f"cuda:{device}" if isinstance(device, int) else (device or "cuda"))

    def cpu(self):
        return self.to("cpu")

    def get_input_embeddings(self):
        return None

    def get_output_embeddings(self):
        return None

    def tie_weights(self, *args, **kwargs):  # no parameters of its own
        return None

    def _init_weights(self, module):
        return None

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # decoding state (per-expert KV caches, routing) is kept by the ensemble, not a Cache

    # ---- forward -------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """Whole rows at every step: the ensemble finds each row's decoding state from its tokens."""
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": kwargs.get("use_cache")}

    def generate(self, *args, **kwargs):
        """HF `generate`, with each row decoded by the ensemble's own cached steps (see the module docstring)."""
        self._decoding = {}
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._decoding = None

    @torch.no_grad()
    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, labels=None,
                use_cache: bool | None = None, logits_to_keep: int = 0, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """logits (B, T, V) = log p(x_{t+1} = · | x_≤t) of the mixture at each real position (0 at padding), or
        (B, 1, V) for the last real token inside `generate` / with logits_to_keep=1. `labels` (B, T), −100 ignored:
        loss = mean −log p of labels[:, 1:]. Rows may be padded left or right."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self._decoding is not None and use_cache is not False:
            logits = self._decode_step(input_ids, attention_mask)  # (B, 1, V)
        elif logits_to_keep == 1 and labels is None:
            logits = self._next_logprobs(input_ids, attention_mask)[:, None]  # (B, 1, V)
        else:
            logits = self._all_logprobs(input_ids, attention_mask)  # (B, T, V)
        loss = None
        if labels is not None:
            target = labels[:, 1:].to(logits.device)  # (B, T-1)
            keep = target != -100
            lp = logits[:, :-1].gather(-1, target.clamp_min(0)[..., None])[..., 0]  # (B, T-1)
            loss = -(lp[keep]).mean()
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _rows(self, input_ids, attention_mask) -> list[list[int]]:
        mask = attention_mask.bool().cpu()
        ids = input_ids.cpu()
        return [ids[b][mask[b]].tolist() for b in range(ids.shape[0])]

    def _right_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, : len(r)] = 1
        return ids, mask

    def _next_logprobs(self, input_ids, attention_mask) -> torch.Tensor:  # (B, V)
        rows = self._rows(input_ids, attention_mask)
        V = self.config.vocab_size
        out = torch.zeros((len(rows), V), device=self.device)
        real = [b for b, r in enumerate(rows) if r]
        if real:
            ids, mask = self._right_padded([rows[b] for b in real])
            out[real] = self.ensemble.next_token_logprobs(ids, mask).float().to(self.device)
        return out

    def _all_logprobs(self, input_ids, attention_mask) -> torch.Tensor:  # (B, T, V)
        B, T = input_ids.shape
        rows = self._rows(input_ids, attention_mask)
        out = torch.zeros((B, T, self.config.vocab_size), device=self.device)
        positions = [torch.nonzero(attention_mask[b].cpu()).flatten() for b in range(B)]  # real positions per row
        real = [b for b in range(B) if rows[b]]
        if not real:
            return out
        ids, mask = self._right_padded([rows[b] for b in real])  # (n, L)
        nxt = self.ensemble.next_token_logprobs(ids, mask).float().to(self.device)  # (n, V)
        for r, b in enumerate(real):
            out[b, positions[b][-1]] = nxt[r]
        if ids.shape[1] >= 2:
            full_at = mask[:, 1:].bool()  # (n, L-1): every real target
            _, full = self.ensemble.score_tokens(ids, mask, None, full_at=full_at)  # (N, V), row-major
            full = full.float().to(self.device)
            start = 0
            for r, b in enumerate(real):
                n = len(rows[b]) - 1
                out[b, positions[b][:n]] = full[start : start + n]
                start += n
        return out

    def _decode_step(self, input_ids, attention_mask) -> torch.Tensor:  # (B, 1, V)
        """One step of generation for every row: the row continues the state of its prefix (its ids minus the last
        token), or starts one when it is new (prefill). Rows that share a prefix (beams) get copies."""
        rows = self._rows(input_ids, attention_mask)
        taken: dict = defaultdict(int)
        entries = []  # (offset, prompt_len, state) per row, all chosen before any state advances
        for r in rows:
            key = tuple(r[:-1])
            pool = self._decoding.get(key, [])
            i, taken[key] = taken[key], taken[key] + 1
            if i < len(pool):
                entries.append(pool[i])
            elif pool:  # more rows than states for this prefix (beam search): a copy of one
                entries.append(copy.deepcopy(pool[0]))
            else:  # a new prompt: its last max_length − 1 tokens, as ScoringModel.generate keeps them
                offset = max(0, len(r) - (self.ensemble.max_length - 1))
                entries.append((offset, len(r) - offset, None))
        out = torch.empty((len(rows), 1, self.config.vocab_size), device=self.device)
        new_pool: dict = defaultdict(list)
        for b, (r, (offset, prompt_len, state)) in enumerate(zip(rows, entries)):
            lp, state = self.ensemble.generation_step(r[offset:], prompt_len, state)  # (V,)
            out[b, 0] = lp.float().to(self.device)
            new_pool[tuple(r)].append((offset, prompt_len, state))
        self._decoding = dict(new_pool)
        return out


# ---- folders ---------------------------------------------------------------------------------------------
def _link_or_copy(src, dst) -> None:
    """Hard link (no extra disk for large files), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _place(src: Path, dst: Path) -> None:
    """`src` (file or folder) at `dst`, hard-linked where possible, replacing what was there."""
    if dst.exists() or dst.is_symlink():
        shutil.rmtree(dst) if dst.is_dir() and not dst.is_symlink() else dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def folder_config(folder: str | os.PathLike, cfg: dict | None = None) -> CBTMEnsembleConfig:
    """The config of an ensemble folder: its config.json, or (a folder written before ensembles were Hugging Face
    models) `ensemble_config` of its ensemble.json `cfg` (read when not given)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return CBTMEnsembleConfig.from_pretrained(folder)
    return ensemble_config(folder, cfg if cfg is not None else read_json(folder / ENSEMBLE_CONFIG))


def ensemble_config(folder: Path, cfg: dict) -> CBTMEnsembleConfig:
    """The config.json of an ensemble folder whose ensemble.json is `cfg`: vocabulary, context and special ids of
    its first expert, and the auto_map of the remote-code shims."""
    experts = expert_dirs(folder, cfg)
    first = read_json(experts[0] / "config.json")
    return CBTMEnsembleConfig(
        # routing_top_k, not top_k: transformers treats a config's top_k as a sampling setting and drops it
        ensemble_kind=cfg.get("kind"), ensemble_name=cfg.get("name"), num_experts=len(experts),
        routing_top_k=cfg.get("top_k") or len(experts),
        vocab_size=int(first["vocab_size"]), max_position_embeddings=folder_context_length(experts[0]),
        bos_token_id=first.get("bos_token_id"), eos_token_id=first.get("eos_token_id"),
        pad_token_id=first.get("pad_token_id"), architectures=[CBTMEnsembleForCausalLM.__name__],
        auto_map={"AutoConfig": "configuration_cbtm_ensemble.CBTMEnsembleConfig",
                  "AutoModelForCausalLM": "modeling_cbtm_ensemble.CBTMEnsembleForCausalLM"},
    )


def write_hf_ensemble(folder: str | os.PathLike, copy_experts: bool = False) -> Path:
    """Make the ensemble folder holding an `ensemble.json` loadable with `AutoModelForCausalLM.from_pretrained`.

    Places the centroids (centroids.npy) and the embedder (embedder/) inside the folder, and with copy_experts the
    experts too (experts/expert_{j:03d}/), hard-linked where the file system allows; rewrites ensemble.json's
    paths; writes config.json, generation_config.json, the tokenizer of the first expert (model_max_length = the
    experts' context) and the remote-code shims. Returns `folder`.
    """
    from transformers import AutoTokenizer

    from experts.compat import make_portable

    folder = Path(folder)
    cfg = check_ensemble_folder(folder)
    experts = expert_dirs(folder, cfg)
    for key, name in (("centroids", CENTROIDS), ("embedder", "embedder")):
        if key in cfg:
            src = resolve(folder, cfg[key])
            if src != (folder / name).resolve():
                _place(src, folder / name)
            cfg[key] = name
    if copy_experts:
        for j, src in enumerate(experts):
            dst = folder / "experts" / expert_name(j)
            if src != dst.resolve():
                _place(src, dst)
                (dst / STAGE_STAMP).unlink(missing_ok=True)  # the training stage's stamp: local paths, host
            cfg["experts"][j] = f"experts/{expert_name(j)}"
            experts[j] = dst
    else:
        cfg["experts"] = [relative(d, folder) for d in experts]
    write_json(folder / ENSEMBLE_CONFIG, cfg)

    config = ensemble_config(folder, cfg)
    max_length = config.max_position_embeddings
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(folder)
    AutoTokenizer.from_pretrained(experts[0]).save_pretrained(folder)
    for module, name in SHIMS.items():
        (folder / module).write_text(
            f'"""{name} for trust_remote_code loading; the implementation is in the cbtm package (it must be '
            f'installed)."""\nfrom experts.hf_ensemble import {name}  # noqa: F401\n', encoding="utf-8")
    make_portable(folder, max_length=max_length)
    return folder


def export_ensemble(src: str | os.PathLike, dst: str | os.PathLike, copy_experts: bool = False) -> Path:
    """Write the ensemble folder `src` as a new folder `dst` (created; its files replaced): ensemble.json with paths
    relative to `dst` (or the experts copied in), router, tokenizer, configs, and src's model card. Returns dst."""
    src, dst = Path(src), Path(dst)
    cfg = check_ensemble_folder(src)
    if dst.resolve() != src.resolve():
        dst.mkdir(parents=True, exist_ok=True)
        cfg["experts"] = [relative(d, dst) for d in expert_dirs(src, cfg)]
        for key in PATH_KEYS:
            if key in cfg:
                cfg[key] = relative(resolve(src, cfg[key]), dst)
        write_json(dst / ENSEMBLE_CONFIG, cfg)
        if (src / "README.md").is_file():
            shutil.copy2(src / "README.md", dst / "README.md")
    return write_hf_ensemble(dst, copy_experts=copy_experts)


def _local_folder(name_or_path, kwargs: dict) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded (it was pushed self-contained)."""
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        return path
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise InputError(f"ensemble folder {name_or_path} does not exist")
    from huggingface_hub import snapshot_download

    keep = ("revision", "cache_dir", "token", "local_files_only", "force_download")
    return Path(snapshot_download(str(name_or_path), **{k: kwargs[k] for k in keep if k in kwargs}))


# ---- the hub ---------------------------------------------------------------------------------------------
def has_weights(folder: Path) -> bool:
    return any((folder / w).is_file() for w in WEIGHT_FILES) or any(folder.glob("model-*.safetensors"))


def upload_files(folder: str | os.PathLike) -> list[str]:
    """Paths (relative, sorted) that `HfApi.upload_folder(folder, ignore_patterns=UPLOAD_IGNORE)` sends: the same
    filter huggingface_hub applies (its default ignores plus the pipeline's stamps)."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    return list(filter_repo_objects(files, ignore_patterns=UPLOAD_IGNORE + DEFAULT_IGNORE_PATTERNS))


def _check_pushable(folder: Path) -> None:
    if (folder / ENSEMBLE_CONFIG).is_file():
        cfg = check_ensemble_folder(folder)
        for d in expert_dirs(folder, cfg):
            if not has_weights(d):
                raise InputError(f"push_to_hub: expert {d} of the ensemble {folder} holds no weights "
                                 "(model.safetensors or pytorch_model.bin)")
    elif not has_weights(folder):
        raise InputError(f"push_to_hub: {folder} holds no weights (model.safetensors or pytorch_model.bin); "
                         "push a model folder of the run")


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool | None = None, token=None,
                commit_message: str | None = None, dry_run: bool = False):
    """Upload a model folder of a run to the hub repo `repo_id` (created if needed). An ensemble folder is exported
    self-contained first (experts copied in). dry_run=True: only the checks, returning `upload_files` of what
    would be uploaded (nothing is sent). Otherwise returns huggingface_hub's commit info."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"push_to_hub: no such folder {folder}")
    _check_pushable(folder)
    with tempfile.TemporaryDirectory(prefix="cbtm-push-") as tmp:
        staged = folder
        if (folder / ENSEMBLE_CONFIG).is_file():
            staged = export_ensemble(folder, Path(tmp) / folder.name, copy_experts=True)
        files = upload_files(staged)
        if dry_run:
            return files
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(folder_path=str(staged), repo_id=repo_id, ignore_patterns=list(UPLOAD_IGNORE),
                                 commit_message=commit_message or f"Upload {folder.name} (cbtm)")


def register() -> None:
    """Register `cbtm_ensemble` with AutoConfig and AutoModelForCausalLM (done when this module is imported,
    which importing `experts` brings about: see experts/__init__.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(MODEL_TYPE, CBTMEnsembleConfig, exist_ok=True)
    AutoModelForCausalLM.register(CBTMEnsembleConfig, CBTMEnsembleForCausalLM, exist_ok=True)


register()

"""Every model a run makes as an lm-evaluation-harness model, registered as `cbtm`.

    cbtm-lm-eval run --model cbtm --model_args pretrained=<folder> --tasks <task> ...     (command line)
    import tasks.lm_eval_model; lm_eval.simple_evaluate(model="cbtm", model_args="pretrained=<folder>", ...)

`pretrained` is a folder of the run: a `save_pretrained` model (seed, dense, expert, average or other merges, MoE)
or an ensemble folder (`ensemble.json`: c-BTM sparse ensemble or BTM posterior ensemble), loaded by
`experts.run_models.load_model` as the pipeline's evaluations load it. Requests go through the project's
`ScoringModel` (`experts.scoring`), the interface those evaluations use:

  loglikelihood          lm-eval's tokenisation (`TemplateLM`: trailing context spaces move to the continuation,
                         the pair is encoded whole; empty context → BOS), rows of at most max_length tokens (context
                         cut on the left; the cut text is the routing prefix of ensembles), Σ log p(continuation)
                         from `score_tokens`, and is_greedy = every continuation token is the argmax of the model's
                         own full distribution (the mixture's, for ensembles)
  loglikelihood_rolling  `ScoringModel.loglikelihood_rolling` ([BOS] + text in max_length windows)
  generate_until         greedy: `ScoringModel.generate` (stops at EOS or an `until` string); do_sample: HF
                         `generate` (for ensembles through `experts.hf_ensemble.CBTMEnsembleForCausalLM`)

lm-eval 0.4.13 reads no plugin entry points, so `lm_eval --model cbtm` knows the name only once this module is
imported: `cbtm-lm-eval` (setup.cfg console script, `main` below) imports it and runs lm-eval's own command line.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's own models: once the registry is not empty it imports none)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from corpus.io import ConfigError, InputError
from experts.run_models import load_model, model_kind

log = logging.getLogger(__name__)

MODEL_ARGS = {"folder": "pretrained", "kind": "kind"}  # experts.run_models.model_kind's fields → model_args


@register_model("cbtm")
class CBTMLM(TemplateLM):
    """lm-eval model over any model folder of a cbtm run (module docstring). model_args: pretrained=<folder>,
    kind=auto|hf|ensemble, device, dtype (bfloat16, float32, auto), batch_size (rows per model call), max_length
    (context; default the model's), max_gen_toks (default 256)."""

    def __init__(self, pretrained: str, kind: str = "auto", device: str | None = None, dtype: str | None = None,
                 batch_size: int | str | None = 16, max_batch_size: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, **kwargs):
        super().__init__()
        if kwargs:
            log.warning("cbtm model ignores model_args %s", sorted(kwargs))
        self.folder = Path(pretrained)
        try:
            self.kind = model_kind(self.folder, kind)
        except ConfigError as e:
            raise InputError(f"model_args {MODEL_ARGS[e.field]}={e.detail}") from None
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device %s requested but CUDA is not available; using the CPU", device)  # lm-eval's default
            device = "cpu"
        self.batch_size = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.model = load_model(self.folder, self.kind, device=device or "auto", dtype=dtype,
                                max_length=int(max_length) if max_length else None, batch_size=self.batch_size)
        self.tokenizer = self.model.tokenizer
        self._device = self.model.device
        self.max_gen_toks = int(max_gen_toks)
        self._hf = None

    # ---- tokenisation ----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.model.bos_ids()[0]

    @property
    def max_length(self) -> int:
        return self.model.max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.folder).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # verbose=False: lm-eval cuts long requests into context-sized windows itself, so the tokenizer's "longer
        # than the maximum sequence length" warning does not apply
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens), verbose=False)["input_ids"]

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # ---- scoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """((context, continuation), context ids, continuation ids) → (Σ log p(continuation), is_greedy)."""
        rows = []
        for _, ctx, cont in requests:
            if not cont:
                raise InputError("lm-eval request with an empty continuation")
            whole = ctx + cont
            cut = max(0, len(whole) - self.max_length)
            prefix = self.tokenizer.decode(whole[:cut]) if cut else ""
            rows.append((whole[cut:], min(len(cont), self.max_length - 1), prefix))
        results = self._score_rows(rows)
        for (pair, _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", pair, res)
        return results

    def _score_rows(self, rows: list[tuple[list[int], int, str]]) -> list[tuple[float, bool]]:
        """rows: (ids, n_target, routing prefix): score the last n_target tokens, longest rows first."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list = [None] * len(rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        step = self.model.pooled_rows(self.batch_size)
        for b in range(0, len(order), step):
            idx = order[b : b + step]
            T = len(rows[idx[0]][0])
            ids = torch.full((len(idx), T), pad, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            scored = torch.zeros((len(idx), T - 1), dtype=torch.bool)  # (B, T-1) continuation targets
            start = torch.zeros(len(idx), dtype=torch.long)
            for r, i in enumerate(idx):
                seq, n, _ = rows[i]
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
                scored[r, len(seq) - 1 - n : len(seq) - 1] = True
                start[r] = len(seq) - n
            lp, full = self.model.score_tokens(ids, mask, [rows[i][2] for i in idx], score_from=start, full_at=scored)
            lp = lp.float().cpu()
            hits = (full.argmax(-1).cpu() == ids[:, 1:][scored]).split(scored.sum(1).tolist())  # per row
            for r, i in enumerate(idx):
                out[i] = (float(lp[r][scored[r]].sum()), bool(hits[r].all()))
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        scores = self.model.loglikelihood_rolling(texts, batch_size=self.batch_size)
        for text, s in zip(texts, scores):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), s)
        return [float(s) for s in scores]

    # ---- generation ------------------------------------------------------------------------------
    def _hf_model(self):
        """The model behind HF `generate` (sampling): the transformers model, or the ensemble wrapped as one."""
        if self._hf is None:
            if self.kind == "hf":
                self._hf = self.model.model
            else:
                from experts.hf_ensemble import CBTMEnsembleForCausalLM, folder_config

                self._hf = CBTMEnsembleForCausalLM(folder_config(self.folder), ensemble=self.model, folder=self.folder)
        return self._hf

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_new = int(kw.pop("max_gen_toks"))
            if kw.pop("do_sample", False):
                text = self._sample(context, until, max_new, kw)
            else:
                text = self.model.generate([context], max_new_tokens=max_new, stop=until)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    def _sample(self, context: str, until: list[str], max_new: int, kw: dict) -> str:
        model = self._hf_model()
        ids = self.tok_encode(context) or [self.prefix_token_id]
        ids = ids[-(self.max_length - 1) :]
        x = torch.tensor([ids], device=self.model.device)
        opts = {k: kw[k] for k in ("temperature", "top_p", "top_k") if k in kw}
        gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                             do_sample=True, stopping_criteria=[_StopOnText(self.tokenizer, until, len(ids))],
                             pad_token_id=self.tokenizer.pad_token_id, **opts)
        text = self.tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True)
        for s in until:
            if s and s in text:
                text = text[: text.index(s)]
        return text


class _StopOnText:
    """HF stopping criterion: the decoded new text contains a stop string (any tokenizer, unlike `stop_strings`,
    which needs one whose tokens decode alone)."""

    def __init__(self, tokenizer, stops: list[str], start: int):
        self.tokenizer, self.stops, self.start = tokenizer, [s for s in stops if s], start

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:  # (B,) bool
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :])
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def main() -> None:
    """`cbtm-lm-eval`: lm-eval's command line with the `cbtm` model registered; bad input ends in one line."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except InputError as e:
        print(f"cbtm-lm-eval: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""One scoring interface for every model the pipeline produces.

Modelled on lm-evaluation-harness's `LM`: `loglikelihood`, `loglikelihood_rolling` and `generate`. Every
model kind (a single expert, the dense baseline, the c-BTM ensemble, the BTM posterior ensemble, the averaged
model, the BTX MoE) implements two token-level methods and inherits the rest, so `tasks/` never special-cases
a model kind.

Subclasses implement:
  - `token_logprobs(input_ids, attention_mask, prefix_texts)` → (B, T-1) log p(x_t | x_<t), t = 1..T-1
  - `next_token_logprobs(input_ids, attention_mask, prefix_texts)` → (B, V) log p(· | whole row)
`prefix_texts[i]` is text that precedes row i but is not in it (document context outside an evaluation
window); routing models may use it, plain models ignore it. Rows are right-padded; outputs at padded
positions are undefined and callers mask them.
"""
from __future__ import annotations

import contextlib
import inspect
from abc import ABC, abstractmethod
from typing import Iterator, Sequence

import torch

from corpus.io import InputError


def document_windows(ids: list[int], max_length: int) -> Iterator[tuple[int, list[int]]]:
    """Yield (start, window ids) covering `ids` so each token after the first is predicted exactly once.

    Window = ids[start : start + max_length], start = 0, L−1, 2(L−1), ...: consecutive windows share one token.
    """
    if max_length < 2:
        raise InputError(f"model context max_length={max_length} is too short to score anything")
    for start in range(0, len(ids) - 1, max_length - 1):
        win = ids[start : start + max_length]
        if len(win) < 2:
            break
        yield start, win


class ScoringModel(ABC):
    tokenizer = None  # a transformers PreTrainedTokenizerFast shared by all experts
    max_length: int = 1024
    device: torch.device = torch.device("cpu")
    name: str = "model"

    @abstractmethod
    def token_logprobs(
        self,
        input_ids: torch.Tensor,  # (B, T) long
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 for real tokens
        prefix_texts: Sequence[str] | None = None,
    ) -> torch.Tensor:  # (B, T-1) float32
        ...

    @abstractmethod
    def next_token_logprobs(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,
        prefix_texts: Sequence[str] | None = None,
    ) -> torch.Tensor:  # (B, V) float32, distribution after the last real token of each row
        ...

    def pooled_rows(self, rows_per_call: int) -> int:
        """Rows to hand to one scoring call so that each underlying model call gets about `rows_per_call` rows
        (a single model: the same; a sparse ensemble: k / top_k times as many, split among the routed experts)."""
        return rows_per_call

    # ---- derived methods -------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # windows follow: no warning

    def bos_ids(self) -> list[int]:
        """[BOS] (or [EOS] when the tokenizer has no BOS) that starts every scored document; [] if neither."""
        bos = self.tokenizer.bos_token_id
        if bos is None:
            bos = self.tokenizer.eos_token_id
        return [bos] if bos is not None else []

    @torch.no_grad()
    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], batch_size: int = 16
    ) -> list[tuple[float, bool]]:
        """For each (context, continuation): (Σ log p(continuation tokens | context), is_greedy).

        The context is left-truncated so context + continuation fits `max_length` (BOS first when the
        context is empty). `is_greedy` is True when every continuation token is the argmax.
        """
        rows = []
        for context, continuation in requests:
            ctx = self._encode(context) if context else []
            cont = self._encode(continuation)
            if not cont:
                raise ValueError(f"continuation {continuation!r} tokenizes to nothing")
            ctx = self.bos_ids() + ctx if not ctx else ctx
            ids = (ctx + cont)[-self.max_length :]
            rows.append((ids, len(cont)))
        return self._score_rows(rows, batch_size, need_greedy=True)

    @torch.no_grad()
    def loglikelihood_rolling(self, texts: Sequence[str], batch_size: int = 8) -> list[float]:
        """Σ log p over all tokens of each text (after a BOS), in non-overlapping windows of max_length.

        Window w > 0 is scored without the tokens of earlier windows as attention context; their text is
        passed as `prefix_texts` so routing models can still use it.
        """
        out = []
        for text in texts:
            ids = self.bos_ids() + self._encode(text)
            windows = [(win, len(win) - 1, self.tokenizer.decode(ids[1:start]) if start > 1 else "")
                       for start, win in document_windows(ids, self.max_length)]
            scores = self._score_rows([(w, n) for w, n, _ in windows], batch_size, [p for _, _, p in windows])
            out.append(sum(s for s, _ in scores))
        return out

    def score_tokens(
        self,
        input_ids: torch.Tensor,  # (B, T) long
        attention_mask: torch.Tensor | None = None,  # (B, T)
        prefix_texts: Sequence[str] | None = None,
        score_from: torch.Tensor | None = None,  # (B,) first target position t each row needs; default 1
        full_at: torch.Tensor | None = None,  # (B, T-1) bool: positions whose full distribution is wanted
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`token_logprobs` plus, optionally, full log-distributions at the positions `full_at` marks.

        Returns `(lp (B, T-1), full (N, V) | None)` with N = full_at.sum() in row-major order. Outputs at
        target positions before `score_from` are undefined (routing models skip them). The default
        implementation cannot give full distributions and returns None for them.
        """
        return self.token_logprobs(input_ids, attention_mask, prefix_texts), None

    def _score_rows(self, rows, batch_size, prefixes=None, need_greedy=False) -> list[tuple[float, bool]]:
        """rows: (ids, n_target) — score the last n_target tokens of each row; is_greedy when asked."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            T = max(len(rows[i][0]) for i in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            scored = torch.zeros((len(idx), max(T - 1, 0)), dtype=torch.bool)  # (B, T-1)
            start = torch.zeros(len(idx), dtype=torch.long)
            for r, i in enumerate(idx):
                seq, n_t = rows[i]
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
                scored[r, len(seq) - 1 - n_t : len(seq) - 1] = True
                start[r] = len(seq) - n_t  # first target position
            ids, mask = ids.to(self.device), mask.to(self.device)
            pre = [prefixes[i] for i in idx] if prefixes is not None else None
            lp, full = self.score_tokens(ids, mask, pre, score_from=start, full_at=scored if need_greedy else None)
            greedy = [False] * len(idx)
            if full is not None:
                hit = full.argmax(-1).cpu() == ids[:, 1:].cpu()[scored]  # (N,)
                per_row = torch.split(hit, scored.sum(1).tolist())
                greedy = [bool(h.all()) for h in per_row]
            lp = lp.float().cpu()
            for r, i in enumerate(idx):
                results[i] = (float(lp[r][scored[r]].sum()), greedy[r])
        return results  # type: ignore[return-value]

    # ---- generation --------------------------------------------------------------------------------
    def generation_step(self, ids: list[int], prompt_len: int, state=None) -> tuple[torch.Tensor, object]:
        """log p(· | ids) as a (V,) tensor, plus a state object carried to the next step of the same prompt.

        `prompt_len` is the number of prompt tokens at the start of `ids` (routing models route on them).
        The default recomputes the whole row; subclasses keep KV caches in `state`.
        """
        x = torch.tensor([ids[-self.max_length :]], device=self.device)
        return self.next_token_logprobs(x, torch.ones_like(x), [""])[0], None

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[str], max_new_tokens: int = 32, stop: Sequence[str] = ()
    ) -> list[str]:
        """Greedy decoding, one prompt at a time; stops at EOS, at any `stop` string, or after max_new_tokens."""
        outs = []
        eos = self.tokenizer.eos_token_id
        for prompt in prompts:
            ids = (self._encode(prompt) or self.bos_ids())[-(self.max_length - 1) :]
            prompt_len = len(ids)
            state = None
            new: list[int] = []
            for _ in range(max_new_tokens):
                logprobs, state = self.generation_step(ids + new, prompt_len, state)
                nxt = int(logprobs.argmax(-1))
                if nxt == eos:
                    break
                new.append(nxt)
                text = self.tokenizer.decode(new)
                if any(s in text for s in stop):
                    break
            text = self.tokenizer.decode(new)
            for s in stop:
                if s in text:
                    text = text[: text.index(s)]
            outs.append(text)
        return outs


# Model types whose causal-LM forward is exactly logits = output_embeddings(base_model(...).last_hidden_state):
# for these the output layer can run on chunks of positions (no logit scaling or soft-capping to replicate).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                                    "gpt2", "gpt_neox", "olmo", "olmo2", "phi3", "starcoder2"})
LOGIT_CHUNK_ELEMENTS = 2**27  # logits materialised at once by `target_logprobs` (512 MiB in float32)


def target_logprobs(
    x: torch.Tensor,  # (N, H) final hidden states, or (N, V) logits when `head` is None
    targets: torch.Tensor,  # (N,) long
    head: torch.nn.Module | None = None,
) -> torch.Tensor:  # (N,) float32
    """log softmax(head(x))[target], computed LOGIT_CHUNK_ELEMENTS at a time.

    Each chunk's logits (in the compute dtype, bf16 under autocast) go through a float32 log-softmax that reads
    them once (`log_softmax(..., dtype=float32)`); the full (N, V) float32 logits never exist, so memory and
    traffic do not grow with the batch.
    """
    V = x.shape[-1] if head is None else head.weight.shape[0]
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    step = max(1, LOGIT_CHUNK_ELEMENTS // V)
    for a in range(0, x.shape[0], step):
        logits = x[a : a + step] if head is None else head(x[a : a + step])  # (n, V)
        lsm = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        out[a : a + step] = lsm.gather(1, targets[a : a + step, None])[:, 0]
    return out


class HFCausalLM(ScoringModel):
    """A single transformers causal LM (an expert, the dense model, the averaged model, the MoE).

    Scoring runs the decoder once and the output layer only where needed, in chunks (`target_logprobs`), for
    model types in PLAIN_HEAD_MODEL_TYPES; other models go through their own forward (full logits).
    """

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", name: str = "model", max_length: int | None = None):
        from corpus.device import resolve_device

        self.setup = resolve_device(device)
        self.device = self.setup.device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.name = name
        ctx = getattr(model.config, "max_position_embeddings", 1024)
        self.max_length = int(max_length or ctx)
        self.split = None  # (decoder, output layer) when the model's logits are output_layer(decoder hidden states)
        decoder, head = getattr(model, "base_model", model), model.get_output_embeddings()
        if getattr(model.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES and decoder is not model and head is not None:
            self.split = (decoder, head)
        # the KV cache's argument is `cache` in newer transformers (`past_key_values` warns there), `past_key_values`
        # in older ones (≥ 5.1): the name this model's forward takes, looked up once (`generation_step` runs per token)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def to(self, device: str | torch.device) -> "HFCausalLM":
        """Move the weights to `device`, with that device's compute setup (bf16 autocast on CUDA)."""
        from corpus.device import resolve_device

        self.setup = resolve_device(device)
        self.device = self.setup.device
        self.model.to(self.device)
        return self

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu", name: str | None = None, **kw):
        from experts.model import load_causal_lm

        model, tokenizer = load_causal_lm(path)
        return cls(model, tokenizer, device=device, name=name or str(path), **kw)

    def _compute(self):
        """Autocast, and on CUDA every SDPA backend but cuDNN attention: cuDNN builds an execution plan for each
        new input shape (tens to hundreds of ms, torch 2.11 tries it first on Hopper), and scoring meets many
        shapes (rows per expert call, window lengths, generation steps); flash attention has no such set-up."""
        if self.device.type != "cuda":
            return self.setup.autocast()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack = contextlib.ExitStack()
        stack.enter_context(self.setup.autocast())
        stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))
        return stack

    def logits(self, input_ids, attention_mask=None, keep: int = 0) -> torch.Tensor:
        """(B, T, V) logits, or only the last `keep` positions (B, keep, V) when keep > 0."""
        with self._compute():
            if keep:
                return self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep,
                                  use_cache=False).logits
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _outputs(self, input_ids, attention_mask, s0: int) -> tuple[torch.Tensor, torch.nn.Module | None]:
        """What predicts targets s0+1..T-1: final hidden states (B, T-1-s0, H) and the output layer, or logits
        (B, T-1-s0, V) and None for models without a plain output layer."""
        if self.split is None:
            return self.logits(input_ids, attention_mask, keep=input_ids.shape[1] - s0 if s0 else 0)[:, :-1], None
        decoder, head = self.split
        with self._compute():
            h = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, H)
        return h[:, s0:-1], head

    @torch.no_grad()
    def token_logprobs(self, input_ids, attention_mask=None, prefix_texts=None):
        return self.score_tokens(input_ids, attention_mask, prefix_texts)[0]

    @torch.no_grad()
    def score_tokens(self, input_ids, attention_mask=None, prefix_texts=None, score_from=None, full_at=None):
        """One forward pass: target log-probs (B, T-1) and, where `full_at` marks, full log-distributions.

        With `score_from`, the output layer runs only from the earliest position any row needs (few-shot
        prompts score a few label tokens after hundreds of prompt tokens); earlier outputs are left at 0.
        Inputs may be on any device; outputs are on `self.device`. With CPU inputs nothing here waits for the
        device, so the caller can prepare its next batch while this one runs.
        """
        B, T = input_ids.shape
        if attention_mask is not None and attention_mask.device.type == "cpu" and bool(attention_mask.all()):
            attention_mask = None  # no padding: spares the model a check of the mask on the device (a host sync)
        input_ids = input_ids.to(self.device, non_blocking=True)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device, non_blocking=True)
        s0 = 0 if score_from is None else max(int(score_from.min()) - 1, 0)  # first output position needed
        x, head = self._outputs(input_ids, attention_mask, s0)  # (B, T-1-s0, H or V)
        target = input_ids[:, s0 + 1 :]  # (B, T-1-s0)
        with self._compute():
            lp_part = target_logprobs(x.reshape(-1, x.shape[-1]), target.reshape(-1), head)
        lp = torch.zeros((B, T - 1), dtype=torch.float32, device=self.device)
        lp[:, s0:] = lp_part.view(B, T - 1 - s0)
        full = None
        if full_at is not None:
            sel = x[full_at[:, s0:].to(self.device)]  # (N, H or V)
            with self._compute():
                full = torch.log_softmax(sel if head is None else head(sel), dim=-1, dtype=torch.float32)  # (N, V)
        return lp, full

    @torch.no_grad()
    def next_token_logprobs(self, input_ids, attention_mask=None, prefix_texts=None):
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=self.device)
        else:
            attention_mask = attention_mask.to(self.device)
            last = attention_mask.sum(1) - 1
        rows = torch.arange(len(last), device=self.device)
        if self.split is None:
            return torch.log_softmax(self.logits(input_ids, attention_mask)[rows, last].float(), dim=-1)
        decoder, head = self.split
        with self._compute():
            h = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[rows, last]
            return torch.log_softmax(head(h), dim=-1, dtype=torch.float32)  # (B, V)

    @torch.no_grad()
    def generation_step(self, ids, prompt_len, state=None):
        """KV-cached step: feeds only the tokens not yet in the cache. state = (the KV cache, n_cached).

        When the row outgrows `max_length` the cache is dropped and the last `max_length` tokens are rerun.
        """
        if len(ids) > self.max_length:
            ids, state = ids[-self.max_length :], None
        past, n_cached = state if state is not None else (None, 0)
        if n_cached >= len(ids):  # nothing new (cannot happen in greedy decoding; be safe)
            past, n_cached = None, 0
        x = torch.tensor([ids[n_cached:]], device=self.device)  # (1, n_new)
        name = self.cache_arg
        with self._compute():
            out = self.model(input_ids=x, use_cache=True, **{name: past})
        logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,)
        return logprobs, (getattr(out, name), len(ids))

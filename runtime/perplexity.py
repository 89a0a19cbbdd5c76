"""Perplexity of a loaded model under its plan, computed as llama.cpp's `llama-perplexity` computes it.

The windows follow `perplexity()` in llama.cpp's tools/perplexity/perplexity.cpp (its default mode,
`--ppl-stride 0`), step by step:
  - the text is tokenized once with the tokenizer's special tokens (`common_tokenize(ctx, text, true)`:
    the BOS in front where the tokenizer adds one, no EOS);
  - it is cut into `len(ids) // n_ctx` chunks of n_ctx consecutive tokens, each evaluated from an empty KV
    cache, with its first token replaced by the BOS (where the tokenizer adds one);
  - in each chunk only the second half is scored: the logits at positions first .. n_ctx-2 (first = n_ctx/2)
    against the tokens at first+1 .. n_ctx-1, so every scored token has at least n_ctx/2 tokens of context
    and a chunk scores n_ctx - first - 1 tokens;
  - a token's negative log-likelihood is max(logits) + log(sum(exp(logits - max))) - logits[token], the
    sum in double precision; the perplexity is exp of the mean over all scored tokens, and its error
    estimate exp(mean) * sqrt((mean of squares - mean^2) / (count - 1)), as llama.cpp prints it.
One difference, in what is refused, not in the number: llama.cpp refuses a text under 2 * n_ctx tokens;
here a text of at least one window is scored (it has one chunk).

The forward passes go through the runtime's loaded model, so what is measured is the model as the plan
runs it: its expert storage (bf16, int8 or int4), its cache and its CPU kernels.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

DEFAULT_CONTEXT = 512  # llama-perplexity's default n_ctx (tools/perplexity/perplexity.cpp: params.n_ctx = 512)


class PerplexityError(UserError):
    """A text, context or token budget that cannot give a perplexity."""


@dataclass(frozen=True)
class Windows:
    """Which tokens are evaluated and scored: chunk c is ids[c*context : (c+1)*context]."""
    context: int
    chunks: int
    bos_id: int | None  # replaces each chunk's first token, where the tokenizer adds a BOS

    @property
    def first(self) -> int:
        """The first position of a chunk whose logits are scored (llama.cpp: `first = n_ctx/2`)."""
        return self.context // 2

    @property
    def scored_per_chunk(self) -> int:
        return self.context - self.first - 1

    def chunk(self, ids: list[int], index: int) -> list[int]:
        window = ids[index * self.context:(index + 1) * self.context]
        if self.bos_id is not None:
            window[0] = self.bos_id
        return window


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, nats
    perplexity_error: float  # llama.cpp's "+/-" estimate
    tokens: int  # scored tokens
    chunks: int
    context: int
    text_tokens: int  # tokens of the text (after --max-tokens), of which whole chunks were evaluated

    def as_dict(self) -> dict[str, Any]:
        return {"perplexity": self.perplexity, "tokens": self.tokens, "nll": self.nll,
                "perplexity_error": self.perplexity_error, "chunks": self.chunks, "context": self.context,
                "text_tokens": self.text_tokens}


def bos_to_add(tokenizer: Any) -> int | None:
    """The BOS id the tokenizer puts in front of an encoded text, or None when it adds none
    (llama.cpp's `llama_vocab_get_add_bos`)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    return bos if list(tokenizer("")["input_ids"])[:1] == [bos] else None


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """The text's tokens as llama-perplexity gets them: the BOS in front where the tokenizer adds one, and
    no other special token (llama.cpp asserts that the vocabulary adds no EOS)."""
    bos = bos_to_add(tokenizer)
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return ([bos] if bos is not None else []) + ids


def plan_windows(n_tokens: int, context: int, max_context: int | None, bos_id: int | None,
                 source: str = "the text") -> Windows:
    """The chunks of a text of `n_tokens` tokens, or a one-line error for a context the model cannot take
    or a text shorter than one window."""
    if context < 4:
        raise PerplexityError(f"--context: must be at least 4 tokens (half of each window is scored), got {context}")
    if max_context is not None and context > max_context:
        raise PerplexityError(f"--context: {context} tokens is longer than the model's context of {max_context} "
                              f"(max_position_embeddings)")
    if n_tokens < context:
        raise PerplexityError(f"{source}: tokenizes to {n_tokens} tokens, fewer than one window of --context "
                              f"{context}")
    return Windows(context, n_tokens // context, bos_id)


def model_context(model_dir: str | Path) -> int | None:
    """The longest context the checkpoint's config.json admits (max_position_embeddings), if it says; read
    before any weight, so that a context too long is refused before the model loads."""
    from .loader import check_model_dir

    value = check_model_dir(Path(model_dir).expanduser()).get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def default_context(max_context: int | None) -> int:
    """llama-perplexity's default window, 512 tokens, or the model's context where it is shorter."""
    return min(DEFAULT_CONTEXT, max_context) if max_context else DEFAULT_CONTEXT


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's negative log-likelihood of its target, in float64: max + log(sum(exp(l - max))) - l[target]
    (llama.cpp's log_softmax over float32 logits, the sum in double)."""
    logits = logits.float()
    top = logits.max(dim=-1, keepdim=True).values
    sums = torch.exp(logits - top).double().sum(dim=-1)
    picked = logits.gather(-1, targets[:, None])[:, 0]
    return top[:, 0].double() + torch.log(sums) - picked.double()


@torch.inference_mode()
def evaluate(forward: Callable[[list[int]], torch.Tensor], ids: list[int], windows: Windows,
             progress: bool = True) -> PerplexityResult:
    """Score `windows` of `ids`; `forward(window)` returns the window's logits [n_ctx, vocab] from an empty
    KV cache."""
    nll_sum, nll_squares, count = 0.0, 0.0, 0
    first = windows.first
    bar = _progress_bar(windows.chunks, progress)
    try:
        for c in range(windows.chunks):
            window = windows.chunk(ids, c)
            logits = forward(window)
            targets = torch.tensor(window[first + 1:], dtype=torch.long)
            values = token_nll(logits[first:windows.context - 1].to("cpu"), targets)
            nll_sum += float(values.sum())
            nll_squares += float((values * values).sum())
            count += windows.scored_per_chunk
            if bar is not None:
                bar.set_postfix(ppl=f"{math.exp(nll_sum / count):.4f}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    mean = nll_sum / count
    variance = nll_squares / count - mean * mean
    ppl = math.exp(mean)
    error = ppl * math.sqrt(variance / (count - 1)) if variance > 0 and count > 1 else 0.0
    return PerplexityResult(ppl, mean, error, count, windows.chunks, windows.context, len(ids))


def session_forward(session: Any) -> Callable[[list[int]], torch.Tensor]:
    """One window through the session's model, as the runtime runs a prefill pass (the plan's experts,
    cache and kernels), with no KV cache carried between windows."""
    model, device, engine = session.loaded.model, session.loaded.device, session.engine

    def forward(window: list[int]) -> torch.Tensor:
        engine.begin_pass("prefill", len(window))
        out = model(input_ids=torch.tensor([window], device=device), use_cache=False)
        return out.logits[0]

    return forward


def load_tokenizer(model_dir: str | Path) -> Any:
    """The checkpoint's tokenizer alone (the text is tokenized and checked before any weight is read)."""
    from transformers import AutoTokenizer

    from .errors import ModelError
    from .loader import check_model_dir

    folder = Path(model_dir).expanduser()
    check_model_dir(folder)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises many kinds here; all mean "no usable tokenizer"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelError(f"{folder}: cannot load the tokenizer ({first})") from None


def prepare(tokenizer: Any, text: str, context: int, max_context: int | None, max_tokens: int | None = None,
            source: str = "the text") -> tuple[list[int], Windows]:
    """The text's tokens (the first `max_tokens` of them, if given) and its windows, or a one-line error."""
    ids = text_ids(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids, plan_windows(len(ids), context, max_context, bos_to_add(tokenizer), source)


def session_perplexity(session: Any, ids: list[int], windows: Windows, progress: bool = True) -> PerplexityResult:
    """Perplexity of the tokens `ids` under the session's plan, over `windows` (see the module docstring)."""
    return evaluate(session_forward(session), ids, windows, progress)


def _progress_bar(total: int, on: bool):
    if not on:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, unit="chunk", desc="perplexity", dynamic_ncols=True)

"""The Python API: load a plan once, then generate as an iterator of text pieces (`moeplan serve` uses it).

    from runtime.textgen import TextGenerator

    model = TextGenerator.load("plans/tiny-moe.yaml", model_dir="models/tiny-moe")
    completion = model.complete("def fibonacci(n):", max_new_tokens=48, stop=["\\n\\n"])
    for piece in completion:
        print(piece, end="", flush=True)
    print(completion.finish_reason, completion.prompt_tokens, completion.completion_tokens)

One generation runs at a time per model: the model's KV cache and expert cache are not shared between
threads. `Completion.cancel()` may be called from any thread; the generation stops before its next token.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .chat import FALLBACK_STOP, chat_prompt_ids, has_template
from .errors import ContextLengthError, PlanError
from .plan import Plan
from .session import GenerationResult, Session, Token
from .stop_strings import StopMatcher

# The memory check sizes the KV cache for this many tokens when the checkpoint's config names no context.
UNKNOWN_CONTEXT_TOKENS = 2048


class Completion:
    """One generation, computed lazily as it is iterated: each item is the next piece of text (never empty).

    After the iteration ends: `finish_reason` is "stop" (an end-of-text token or a stop string), "length"
    (`max_new_tokens` reached) or "cancelled"; `text` is everything yielded.
    """

    def __init__(self, tokens: Generator[Token, None, GenerationResult], prompt_tokens: int,
                 max_new_tokens: int, stop: StopMatcher, end_ids: set[int]) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.stop_strings = stop.stops
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None  # time.perf_counter() when the first token came out
        self.last_token_at: float | None = None
        self.result: GenerationResult | None = None  # set when generation ran to its natural end
        self._tokens = tokens
        self._stop = stop
        self._end_ids = end_ids
        self._last_id: int | None = None
        self._parts: list[str] = []
        self._cancelled = threading.Event()

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time they took (the first comes out of the prompt's pass)."""
        if self.completion_tokens < 2 or self.first_token_at is None or self.last_token_at is None:
            return 0.0
        seconds = self.last_token_at - self.first_token_at
        return (self.completion_tokens - 1) / seconds if seconds > 0 else 0.0

    def cancel(self) -> None:
        """Stop before the next token (thread-safe): a client that went away, a user who pressed stop."""
        self._cancelled.set()

    def __iter__(self) -> Completion:
        return self

    def __next__(self) -> str:
        while self.finish_reason is None:
            if self._cancelled.is_set():
                self._end("cancelled")
                break
            try:
                token = next(self._tokens)
            except StopIteration as done:
                self.result = done.value
                ended = self._last_id in self._end_ids or self.completion_tokens < self.max_new_tokens
                self._end("stop" if ended else "length")
                tail = self._stop.flush()  # held back as a possible stop string, which it was not
                if tail:
                    return self._emit(tail)
                break
            self.last_token_at = time.perf_counter()
            if self.first_token_at is None:
                self.first_token_at = self.last_token_at
            self.completion_tokens += 1
            self._last_id = token.id
            piece = self._stop.feed(token.text)
            if self._stop.stopped:
                self._end("stop")
            if piece:
                return self._emit(piece)
        raise StopIteration

    def _emit(self, piece: str) -> str:
        self._parts.append(piece)
        return piece

    def _end(self, reason: str) -> None:
        self.finish_reason = reason
        if reason != "length" and self.result is None:
            self._tokens.close()  # ends the forward passes now; nothing else holds the model


class TextGenerator:
    """A plan and its checkpoint, loaded once, that generates completions one at a time."""

    def __init__(self, session: Session, context_tokens: int, name: str) -> None:
        self.session = session
        self.context_tokens = context_tokens
        self.name = name

    @classmethod
    def load(cls, plan: str | Path | Plan, model_dir: str | Path | None = None, context_tokens: int | None = None,
             huge_pages: bool | None = None) -> TextGenerator:
        """Load the plan's model. `context_tokens` caps prompt plus new tokens (default: the checkpoint's
        `max_position_embeddings`); the memory check sizes the KV cache for it."""
        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        folder = model_dir if model_dir is not None else plan.model.path
        if not folder:
            raise PlanError("model.path: the plan names no model folder; give one with --model DIR")
        configured = _configured_context(Path(folder).expanduser())
        if context_tokens is not None and configured is not None and context_tokens > configured:
            raise PlanError(f"--context: {context_tokens} tokens is more than the model's max_position_embeddings "
                            f"({configured})")
        context = context_tokens or configured or UNKNOWN_CONTEXT_TOKENS
        session = Session.load(plan, folder, context_tokens=context, huge_pages=huge_pages)
        return cls(session, context, model_name(plan, model_dir))

    @property
    def tokenizer(self) -> Any:
        return self.session.loaded.tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.session.loaded.model.config.vocab_size)

    @property
    def has_chat_template(self) -> bool:
        return has_template(self.tokenizer)

    def encode(self, prompt: str) -> list[int]:
        """Prompt ids as `moeplan run` encodes a prompt (the tokenizer's default special tokens)."""
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Prompt ids for a conversation ([{"role": ..., "content": ...}]), ready for the assistant's turn."""
        return chat_prompt_ids(self.tokenizer, messages)

    def complete(self, prompt: str | Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = ()) -> Completion:
        """A completion of `prompt` (text, or token ids as they are); nothing runs until it is iterated."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise PlanError("prompt: the prompt encodes to no tokens")
        outside = [i for i in ids if not 0 <= i < self.vocab_size]
        if outside:
            raise PlanError(f"prompt: token id {outside[0]} is outside the vocabulary (0 to {self.vocab_size - 1})")
        if max_new_tokens < 1:
            raise PlanError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        if len(ids) + max_new_tokens > self.context_tokens:
            raise ContextLengthError(len(ids), max_new_tokens, self.context_tokens)
        tokens = self.session.stream(ids, max_new_tokens, temperature, top_p, seed)
        return Completion(tokens, len(ids), max_new_tokens, StopMatcher(stop), self.session.end_token_ids)

    def chat(self, messages: Sequence[Mapping[str, str]], max_new_tokens: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = ()) -> Completion:
        """The assistant's reply to `messages`; `max_new_tokens` defaults to the rest of the context. Without a
        chat template the fallback format also stops where the user's next turn would start."""
        ids = self.encode_chat(messages)
        if max_new_tokens is None:
            max_new_tokens = max(self.context_tokens - len(ids), 1)
        stops = list(stop) if self.has_chat_template else [*stop, FALLBACK_STOP]
        return self.complete(ids, max_new_tokens, temperature, top_p, seed, stops)


def model_name(plan: Plan, model_dir: str | Path | None = None) -> str:
    """The name the model goes by (the plan's `model.name`, else its folder's name): what an API client asks for."""
    folder = model_dir if model_dir is not None else plan.model.path
    return plan.model.name or (Path(folder).expanduser().resolve().name if folder else "model")


def _configured_context(folder: Path) -> int | None:
    """`max_position_embeddings` from the checkpoint's config.json, or None (a missing or broken config is
    reported by the loader, with the file's name)."""
    try:
        value = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None

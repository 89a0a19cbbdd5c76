"""A loaded model with its plan: generate text, stream it, and report what the cache did.

    session = Session.load(Plan.load("plans/x.yaml"), model_dir="models/tiny-moe")
    result = session.generate("def fibonacci(n):", max_new_tokens=32, on_text=print)
    for token in session.stream("def fibonacci(n):", max_new_tokens=32):  # or token by token
        print(token.text, end="")
"""
from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .contracts.traces import header_record
from .device import DeviceSeam
from .engine import Engine
from .errors import PlanError
from .kv_cache import use_growing_layers
from .memory_guard import check_fits, memory_plan
from .loader import LoadedModel, inspect_model, load_model, resolve_device
from .plan import Plan
from .replay import RoutingReplay
from .sampling import Sampler


@dataclass(frozen=True)
class Token:
    """One generated token and the text it completes: empty while a multi-byte character is still partial."""
    id: int
    text: str


@dataclass
class GenerationResult:
    generated_ids: list[int]
    text: str
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        decoded = len(self.generated_ids) - 1  # the first new token comes out of the prefill pass
        return decoded / self.decode_seconds if decoded > 0 and self.decode_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"generated_ids": self.generated_ids, "text": self.text, "prompt_tokens": self.prompt_tokens,
                "prefill_seconds": self.prefill_seconds, "decode_tokens_per_s": self.decode_tokens_per_s,
                "decode_seconds": self.decode_seconds, **self.stats}


class Session:
    def __init__(self, loaded: LoadedModel, plan: Plan, replay: RoutingReplay | None = None,
                 huge_pages: bool | None = None, seam: DeviceSeam | None = None) -> None:
        """`seam`: the accelerator's calls (runtime/device.py; by default the engine's choice for the device)."""
        self.loaded = loaded
        self.plan = plan
        self.engine = Engine(loaded, plan, replay, huge_pages, seam)

    @property
    def end_token_ids(self) -> set[int]:
        """The ids that end a generation (the config's `eos_token_id`, one or several)."""
        return _stop_ids(self.loaded.model.config)

    @classmethod
    def load(cls, plan: Plan, model_dir: str | Path | None = None, replay_trace: str | Path | None = None,
             context_tokens: int = 2048, huge_pages: bool | None = None) -> "Session":
        """Check the plan against the checkpoint and this host's memory, then load.

        `context_tokens` (prompt + new tokens, an upper bound is fine) sizes the KV cache in the memory check;
        `huge_pages`: True moves every CPU-resident weight not in 2 MB pages yet into them, False none, None
        (the default) the rest only when torch's allocator gave the large ones 2 MB pages (runtime/huge_pages.py).
        """
        folder = model_dir if model_dir is not None else plan.model.path
        if not folder:
            raise PlanError("model.path: the plan names no model folder; give one with --model DIR")
        device = resolve_device(plan.hardware.accelerator)
        shape = inspect_model(folder, plan.model.dtype, plan.model.experts)  # check the plan before reading any weight
        slots = plan.cache.slots_per_layer(shape.num_moe_layers, shape.num_experts)
        plan.cache.preload_per_layer(shape.num_moe_layers, shape.num_experts)
        check_fits(memory_plan(shape, slots, device, context_tokens, rule=plan.miss.rule))
        loaded = load_model(folder, plan.model.dtype, plan.hardware.accelerator, plan.model.experts)
        replay = None
        if replay_trace is not None:
            top_k = int(getattr(loaded.model.config, "num_experts_per_tok"))
            replay = RoutingReplay.load(replay_trace, len(loaded.experts), loaded.experts[0].num_experts, top_k)
        return cls(loaded, plan, replay, huge_pages)

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, on_text: Callable[[str], None] | None = None,
                 trace_out: str | Path | None = None,
                 on_token: Callable[[int, int], None] | None = None) -> GenerationResult:
        """`on_token(step, token_id)` is called after each new token (long-run benchmarks sample memory there)."""
        # without on_text no text is decoded while generating (what `run --json` times stays the model's work)
        tokens = self.stream(prompt, max_new_tokens, temperature, top_p, seed, trace_out, text=on_text is not None)
        step = 0
        while True:
            try:
                token = next(tokens)
            except StopIteration as done:
                return done.value
            if on_text is not None and token.text:
                on_text(token.text)
            if on_token is not None:
                on_token(step, token.id)
            step += 1

    @torch.inference_mode()
    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0,
               trace_out: str | Path | None = None, text: bool = True) -> Generator[Token, None, GenerationResult]:
        """Yield each new token with the text it completes; the generator's return value is the result.

        `prompt` is text (encoded as `tokenizer(prompt)` encodes it) or token ids taken as they are. Closing
        the generator early stops before the next forward pass (and writes no trace). `text=False` leaves
        each token's text empty and decodes only the whole result.
        """
        from transformers import DynamicCache

        model, tokenizer, device = self.loaded.model, self.loaded.tokenizer, self.loaded.device
        prompt_ids = list(tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not prompt_ids:
            raise PlanError("--prompt: the prompt encodes to no tokens")
        recorder = self.engine.record_trace(trace_out is not None)  # this generation's routing, if asked
        sampler = Sampler(temperature, top_p, seed)
        stop_ids = _stop_ids(model.config)
        cache = DynamicCache(config=model.config)
        if device.type == "cpu":
            use_growing_layers(cache)  # appends in place: no copy of the whole cache per token
        forward_kwargs = _forward_arguments(model, cache)
        pieces: list[str] = []
        streamer = _TextStream(tokenizer, pieces.append if text else None)
        generated: list[int] = []

        next_input = torch.tensor([prompt_ids], device=device)
        start = time.perf_counter()
        prefill_seconds = 0.0
        native = self.engine.native  # the native decode step, where the model is one it recognises
        for step in range(max_new_tokens):
            self.engine.begin_pass("prefill" if step == 0 else "decode", next_input.shape[1])
            # a decode token through the native step where it takes it (None: it touched nothing)
            logits = native.step(generated[-1], cache) if step and native is not None else None
            if logits is None:
                logits = model(input_ids=next_input, **forward_kwargs).logits[0, -1]
            token = sampler.pick(logits)
            if step == 0:
                prefill_seconds = time.perf_counter() - start
                start = time.perf_counter()
            generated.append(token)
            last = token in stop_ids or step == max_new_tokens - 1
            streamer.push(generated, final=last)  # the last token also flushes a held-back partial character
            yield Token(token, "".join(pieces))
            pieces.clear()
            if last:
                break
            next_input = torch.tensor([[token]], device=device)
        decode_seconds = time.perf_counter() - start if len(generated) > 1 else 0.0
        if recorder is not None:
            recorder.write(trace_out, self._trace_header(prompt))
        text = tokenizer.decode(generated, skip_special_tokens=True)
        return GenerationResult(generated, text, len(prompt_ids), prefill_seconds, decode_seconds,
                                self.engine.stats())

    def _trace_header(self, prompt: str | Sequence[int]) -> dict[str, Any]:
        experts = self.loaded.experts
        return header_record(self.plan.model.name or self.loaded.model_dir.name, len(experts),
                             experts[0].num_experts, self.engine.top_k, "recorded", dtype=self.plan.model.dtype,
                             model_dir=str(self.loaded.model_dir), prompt=prompt,
                             date=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _forward_arguments(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The model call's keyword arguments besides the input ids: the cache, under the name this version of
    transformers takes (`past_key_values` became `cache` during 5.x), and, where the model takes it,
    `logits_to_keep=1`: only the last position's logits are sampled from, and a prompt's full logits would
    cost the LM head once per prompt token (for Mixtral, a 32000 x 4096 product per token)."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"use_cache": True, "cache" if "cache" in parameters else "past_key_values": cache}
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


def _stop_ids(config: Any) -> set[int]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}


class _TextStream:
    """Turns the growing list of ids into text pieces, holding back an incomplete UTF-8 character.

    Only the ids since the last emitted newline are decoded each step (a line boundary is a clean
    cut for byte-level tokenizers), so streaming costs per token stay bounded on long generations.
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None] | None) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.start = 0  # first id of the line being decoded
        self.sent = 0  # characters of that line already emitted

    def push(self, ids: list[int], final: bool = False) -> None:
        if self.on_text is None:
            return
        text = self.tokenizer.decode(ids[self.start:], skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
        if text.endswith("\n"):
            self.start, self.sent = len(ids), 0
        else:
            self.sent = max(self.sent, len(text))

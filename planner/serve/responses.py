"""Response bodies and stream chunks in OpenAI's shapes, for `/v1/completions` and `/v1/chat/completions`.

A stream is server-sent events: one `data: {chunk}` per text piece, a last chunk with the finish reason
and the usage counts (OpenAI sends usage only when asked; here every response carries it), an extra
usage-only chunk when the client asked with `stream_options.include_usage`, then `data: [DONE]`.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from runtime.textgen import Completion


@dataclass
class ResponseShape:
    """What differs between the two endpoints, and the ids one response shares across its chunks."""
    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": f"{kind}.chunk" if chunk and self.chat else kind,
                "created": self.created, "model": self.model}

    def whole(self, completion: Completion, text: str) -> dict[str, Any]:
        """The non-streamed response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": completion.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": completion.finish_reason}
        return {**self._envelope(chunk=False), "choices": [choice], "usage": usage(completion)}

    def chunk(self, text: str | None = None, finish: Completion | None = None, role: bool = False) -> str:
        """One event: a piece of text, the opening role (chat), or the end with finish reason and usage."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish.finish_reason if finish else None}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None,
                      "finish_reason": finish.finish_reason if finish else None}
        body = {**self._envelope(chunk=True), "choices": [choice]}
        if finish is not None:
            body["usage"] = usage(finish)
        return event(body)

    def usage_chunk(self, completion: Completion) -> str:
        return event({**self._envelope(chunk=True), "choices": [], "usage": usage(completion)})


def usage(completion: Completion) -> dict[str, int]:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def event(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


DONE = event("[DONE]")

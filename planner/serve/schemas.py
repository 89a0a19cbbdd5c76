"""Request bodies of the OpenAI endpoints, validated: a bad body is a 400 that names the field.

Unknown fields are refused rather than ignored (a misspelt `max_token` would otherwise silently do
nothing); fields OpenAI has but this server does not implement (n > 1, logprobs, penalties, tools) are
accepted only at their neutral value, so a client never gets a different behaviour than it asked for.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ApiError

MAX_STOP_STRINGS = 4  # OpenAI's limit
# torch.Generator.manual_seed's range
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What both endpoints share."""
    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0  # OpenAI's default and range
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted at their neutral values only
    n: Literal[1] = 1
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if any(not s for s in stops):
            raise ApiError(400, "stop: a stop string must not be empty", "stop")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    echo: Literal[False] = False
    logprobs: Literal[0] | None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    def single_prompt(self) -> str | list[int]:
        """The prompt as text or token ids; a batch of several prompts is refused (one per request)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt: one prompt per request, got {len(prompt)}", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "prompt: must not be empty", "prompt")
        return prompt  # type: ignore[return-value]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: Literal[False] = False
    top_logprobs: Literal[0] | None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None
    tool_choice: Literal["none"] | None = None

    def message_dicts(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for "system"; chat templates know "system"
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


Request = TypeVar("Request", CompletionRequest, ChatRequest)


def parse(kind: type[Request], body: bytes) -> Request:
    """The validated request, or ApiError(400) naming the first bad field."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # a field with a union type reports one error per branch: the deepest names the real problem
        # (["a", ""] for `stop` fails as "not a string" and, deeper, as "item 1 is empty")
        first = max(reversed(errors), key=lambda e: (e["loc"][0] == errors[0]["loc"][0], len(e["loc"])))
        field = _field_name(first["loc"])
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"{field}: not a supported request field", field) from None
        value = first.get("input")
        shown = json.dumps(value)[:80] if first["type"] != "missing" else "nothing"
        raise ApiError(400, f"{field}: {first['msg'].lower()} (got {shown})", field) from None


def _field_name(loc: tuple[Any, ...]) -> str:
    """`messages[0].content` from pydantic's location, without the union branch tags it inserts there
    (`str`, `list[int]`, `function-after[...]`, model class names)."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part.isidentifier() and part not in _BRANCH_TAGS and not part[0].isupper():
            name += f".{part}" if name else part
    return name or "body"


_BRANCH_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}

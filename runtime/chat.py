"""Chat messages to prompt ids: the tokenizer's own chat template, or a plain fallback for models without one.

The fallback (models/tiny-moe has no template) writes each message as `Role: content` followed by a blank
line and ends with `Assistant:`; the text is then encoded as `moeplan run` encodes a prompt. Generation
in that format stops at `\\nUser:` (FALLBACK_STOP), where such a model would start the user's next turn.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

FALLBACK_STOP = "\nUser:"


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def fallback_text(messages: Sequence[Mapping[str, str]]) -> str:
    turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
    return turns + "Assistant:"


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Prompt ids for a conversation, ready for the assistant's reply."""
    if not has_template(tokenizer):
        return list(tokenizer(fallback_text(messages))["input_ids"])
    # the template writes the special tokens (BOS and the turn markers) itself: encode without adding more
    text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])

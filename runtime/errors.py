"""User errors: one class per kind of mistake, caught by the CLI and printed as one line (exit 1).

Anything that is not a `UserError` is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave moeplan (a file, a field, a flag); the message says which."""


class PlanError(UserError):
    """A plan file that is missing, malformed or out of range."""


class ModelError(UserError):
    """A checkpoint folder that is missing, corrupt, or of a family moeplan cannot run."""


class TraceError(UserError):
    """A routing trace that is missing or malformed."""


class HardwareError(UserError):
    """A plan that asks for hardware this host does not have, or more memory than it has."""


class ContextLengthError(UserError):
    """A prompt that, with the tokens asked for, does not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_tokens: int) -> None:
        self.prompt_tokens, self.max_new_tokens, self.context_tokens = prompt_tokens, max_new_tokens, context_tokens
        super().__init__(f"the context holds {context_tokens} tokens, but {prompt_tokens + max_new_tokens} were asked "
                         f"for ({prompt_tokens} in the prompt, {max_new_tokens} to generate)")

"""Exceptions a caller can catch by type; each message names the problem."""


class AccordionError(Exception):
    """Base class of every error accordion raises on purpose."""


class ModelNotFoundError(AccordionError):
    """A model name is neither bundled, created, nor a path to a file."""


class InvalidModelFileError(AccordionError):
    """A file is not a readable GGUF model (wrong magic, truncated, corrupt).

    `reason` says what is wrong without the file's path, for callers (HTTP clients)
    who must not learn where the server keeps its files."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


class ForbiddenError(AccordionError):
    """The caller may not do this here (a model file outside the allowed folders)."""


class UnsupportedModelError(AccordionError):
    """A valid GGUF whose architecture, tensor type or tokenizer we cannot run."""


class InvalidRequestError(AccordionError, ValueError):
    """A request the caller can fix: malformed messages, bad parameters."""


class TemplateError(AccordionError):
    """A model's chat template failed to compile or render, or rejected the conversation."""


class RequestTooLargeError(AccordionError):
    """A request that alone cannot fit the KV memory budget, however long it waits."""

    def __init__(self, tokens: int, budget_tokens: int) -> None:
        super().__init__(
            f"request needs {tokens} tokens of KV memory but the whole budget holds"
            f" {budget_tokens}; raise the KV budget or shorten the prompt"
        )
        self.tokens = tokens
        self.budget_tokens = budget_tokens


class RequestCancelledError(AccordionError):
    """The caller cancelled the request before it finished."""

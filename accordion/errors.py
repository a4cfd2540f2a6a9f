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
        self.path, self.reason = path, reason

    def __reduce__(self) -> tuple:  # pickled whole between the front and engine processes
        return type(self), (self.path, self.reason)


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

    def __reduce__(self) -> tuple:
        return type(self), (self.tokens, self.budget_tokens)


class RequestCancelledError(AccordionError):
    """The caller cancelled the request before it finished."""


class ModelBrokenError(AccordionError):
    """The engine process crashed loading this model: it is not loaded again until the
    server restarts."""


class EngineRestartedError(AccordionError):
    """The engine process died while this call waited on it; the server restarts it."""


class ResumeError(AccordionError):
    """A request replayed after an engine restart came out differently from what it had
    sent, so it ends instead of sending something else."""

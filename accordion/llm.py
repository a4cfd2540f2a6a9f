"""Offline Python API in the style of vLLM's `LLM`: prompts in, outputs out."""

from __future__ import annotations

from collections.abc import Iterator

from accordion import heap
from accordion.engine.engine import Engine, EngineConfig
from accordion.engine.request import RequestHandle, RequestOutput
from accordion.loader.bundled import DEFAULT_MODEL
from accordion.loader.model import LoadedModel, load_model
from accordion.sampling_params import SamplingParams

Messages = list[dict]

__all__ = ["LLM", "RequestOutput"]


class LLM:
    """Load a model once; generate from raw prompts or chat messages.

    The caller's thread drives the engine while it waits for results, so many
    prompts given together are batched continuously.
    """

    def __init__(
        self, model: str = DEFAULT_MODEL, weights: str = "auto", **engine: int | float | None
    ) -> None:
        self.model: LoadedModel = load_model(model, weights)
        self.engine = Engine(self.model, EngineConfig(**engine))  # type: ignore[arg-type]
        self.tokenizer = self.model.tokenizer
        heap.freeze()  # as the server does after a load: see heap.freeze

    def close(self) -> None:
        self.engine.stop()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- prompts -------------------------------------------------------------------
    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        return self.model.encode_chat(messages, add_generation_prompt=add_generation_prompt)

    def submit(
        self,
        prompt: str | Messages | list[int],
        params: SamplingParams | None = None,
        num_ctx: int | None = None,
    ) -> RequestHandle:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif prompt and isinstance(prompt[0], dict):
            ids = self.encode_chat(prompt)  # type: ignore[arg-type]
        else:
            ids = list(prompt)  # type: ignore[arg-type]
        return self.engine.submit(ids, params, num_ctx)

    # -- batch calls ---------------------------------------------------------------
    def generate_ids(
        self, prompts: list[list[int]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        handles = [self.engine.submit(ids, params) for ids in prompts]
        return [h.result() for h in handles]

    def generate(
        self, prompts: str | list[str], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return self.generate_ids([self.tokenizer.encode(p) for p in prompts], params)

    def chat(
        self, conversations: Messages | list[Messages], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        return self.generate_ids([self.encode_chat(c) for c in conversations], params)  # type: ignore[arg-type]

    # -- streaming -----------------------------------------------------------------
    def stream(self, prompt: str | Messages, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated (a string prompt or chat messages)."""
        handle = self.submit(prompt, params)
        try:
            for event in handle:
                if event.text:
                    yield event.text
        finally:
            if handle.seq.finish_reason is None:  # the caller stopped reading
                handle.cancel()

    # -- memory --------------------------------------------------------------------
    def kv_stats(self) -> dict:
        return self.engine.kv_stats()

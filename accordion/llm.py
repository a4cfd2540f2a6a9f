"""Offline Python API in the style of vLLM's `LLM`: prompts in, outputs out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from accordion.engine.engine import Engine
from accordion.engine.sequence import Sequence
from accordion.loader.bundled import DEFAULT_MODEL
from accordion.loader.model import LoadedModel, load_model
from accordion.sampling_params import SamplingParams

Messages = list[dict]


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def _output(seq: Sequence) -> RequestOutput:
    return RequestOutput(list(seq.prompt_ids), seq.text, list(seq.output_ids), seq.finish_reason)


class LLM:
    """Load a model once; generate from raw prompts or chat messages."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        weights: str = "auto",
        kv_tokens: int | None = None,
        block_size: int = 16,
        num_batch: int = 512,
    ) -> None:
        self.model: LoadedModel = load_model(model, weights)
        tokens = kv_tokens or min(self.model.config.context_length, 16384)
        num_blocks = -(-tokens // block_size)
        self.engine = Engine(self.model, num_blocks, block_size, num_batch)
        self.tokenizer = self.model.tokenizer

    # -- prompts --------------------------------------------------------------
    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        text = self.model.template.render(messages, add_generation_prompt=add_generation_prompt)
        bos = self.tokenizer.bos_token
        # a template that writes BOS itself must not get a second one
        add_bos = None if not bos or not text.startswith(bos) else False
        return self.tokenizer.encode(text, add_bos=add_bos)

    # -- batch calls ----------------------------------------------------------
    def generate_ids(
        self, prompts: list[list[int]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        params = params or SamplingParams()
        seqs = [self.engine.add(ids, params) for ids in prompts]
        while any(s.finish_reason is None for s in seqs):
            self.engine.step()
        return [_output(s) for s in seqs]

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

    # -- streaming ------------------------------------------------------------
    def stream(self, prompt: str | Messages, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated (a string prompt or chat messages)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else self.encode_chat(prompt)
        seq = self.engine.add(ids, params or SamplingParams())
        while seq.finish_reason is None:
            for event in self.engine.step():
                if event.seq is seq and event.text:
                    yield event.text

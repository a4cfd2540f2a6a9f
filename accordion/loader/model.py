"""Everything needed to run a model, loaded from one GGUF file."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from accordion import heap
from accordion.loader.bundled import resolve_model_path
from accordion.loader.chat_template import ChatTemplate
from accordion.loader.gguf_file import GGUFFile, open_gguf
from accordion.loader.tokenizer import Tokenizer
from accordion.models.build import build_decoder
from accordion.models.config import ModelConfig, config_from_gguf
from accordion.models.decoder import Decoder


@dataclass
class LoadedModel:
    name: str
    path: Path
    gguf: GGUFFile
    config: ModelConfig
    tokenizer: Tokenizer
    template: ChatTemplate
    decoder: Decoder | None  # None: loaded for its tokenizer and template only
    weights: str
    load_seconds: float

    def encode_chat(
        self,
        messages: list[dict],
        tools: list | None = None,
        add_generation_prompt: bool = True,
        template: ChatTemplate | None = None,
    ) -> list[int]:
        """Render the chat template (or `template`, a request's own) and tokenize; a
        template that writes BOS gets no second one."""
        text = (template or self.template).render(
            messages, add_generation_prompt=add_generation_prompt, tools=tools
        )
        bos = self.tokenizer.bos_token
        add_bos = False if bos and text.startswith(bos) else None
        return self.tokenizer.encode(text, add_bos=add_bos)


def load_model(name: str, weights: str = "auto", decoder: bool = True) -> LoadedModel:
    """Resolve a model name or path and load it; errors name the problem (AccordionError).
    Without `decoder`, only what a server's front needs: config, tokenizer, template."""
    start = time.perf_counter()
    path = resolve_model_path(name)
    gf = open_gguf(path)
    config = config_from_gguf(gf)  # architecture check before the slow parts
    tokenizer = Tokenizer.from_gguf(gf)
    template = ChatTemplate.from_gguf(gf, tokenizer.bos_token, tokenizer.eos_token)
    built = build_decoder(gf, config, weights) if decoder else None
    heap.trim(collect=True)  # the load's temporaries: ~150 MB for SmolLM2 otherwise
    return LoadedModel(
        name, path, gf, config, tokenizer, template, built, weights, time.perf_counter() - start
    )

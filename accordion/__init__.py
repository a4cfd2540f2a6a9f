"""accordion: a local LLM server whose KV cache follows the conversation."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "RequestOutput", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # imported on first use so `accordion.loader` and the CLI start without torch models
    if name in ("LLM", "RequestOutput"):
        from accordion import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from accordion.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)

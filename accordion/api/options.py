"""Ollama's `options` (and Modelfile PARAMETERs) -> sampling parameters and limits."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from accordion.errors import InvalidRequestError
from accordion.sampling_params import SamplingParams

log = logging.getLogger("accordion.api")

# option -> accepted Python types; anything else is a 400
KNOWN: dict[str, tuple[type, ...]] = {
    "num_ctx": (int,),
    "num_predict": (int,),
    "num_keep": (int,),
    "num_batch": (int,),
    "temperature": (int, float),
    "top_k": (int,),
    "top_p": (int, float),
    "min_p": (int, float),
    "repeat_last_n": (int,),
    "repeat_penalty": (int, float),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
    "seed": (int,),
    "stop": (list, str),
    # samplers we do not have: accepted at their "off" value only (OFF_ONLY)
    "typical_p": (int, float),
    "mirostat": (int,),
    "tfs_z": (int, float),
    # accepted for compatibility; they change nothing here (listed in the README)
    "num_gpu": (int,),
    "main_gpu": (int,),
    "num_thread": (int,),
    "use_mmap": (bool,),
    "use_mlock": (bool,),
    "numa": (bool,),
    "low_vram": (bool,),
    "vocab_only": (bool,),
    "penalize_newline": (bool,),
    "mirostat_tau": (int, float),  # read only by mirostat, which must be off
    "mirostat_eta": (int, float),
}
OFF_ONLY = {"typical_p": 1.0, "mirostat": 0, "tfs_z": 1.0}


@dataclass
class RequestOptions:
    params: SamplingParams
    num_ctx: int | None = None
    num_keep: int = 0
    raw: dict[str, Any] = field(default_factory=dict)


def _check(name: str, value: Any) -> Any:
    kinds = KNOWN[name]
    if isinstance(value, bool) and bool not in kinds:
        raise InvalidRequestError(f"option {name!r} must be {kinds[0].__name__}, got {value!r}")
    if not isinstance(value, kinds):
        raise InvalidRequestError(
            f"option {name!r} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}"
        )
    if isinstance(value, int) and not -(2**63) <= value < 2**63:  # Go's int64, as in Ollama
        raise InvalidRequestError(f"option {name!r} is out of range: {value}")
    if name == "stop" and isinstance(value, list) and not all(isinstance(s, str) for s in value):
        raise InvalidRequestError("option 'stop' must be a list of strings")
    if name in OFF_ONLY and value != OFF_ONLY[name]:  # a 400, not a sampler silently missing
        raise InvalidRequestError(
            f"option {name}={value} is not supported (only {OFF_ONLY[name]:g}, off)"
        )
    return value


def merge(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Later layers win: Modelfile parameters, then the request's options."""
    out: dict[str, Any] = {}
    for layer in layers:
        for name, value in (layer or {}).items():
            if name not in KNOWN:
                log.warning("ignoring unknown option %s", name)
                continue
            if value is None:
                continue
            out[name] = _check(name, value)
    return out


def to_request_options(options: dict[str, Any]) -> RequestOptions:
    num_predict = options.get("num_predict", -1)
    if num_predict < -2:
        raise InvalidRequestError(f"num_predict must be -1, -2 or >= 0, got {num_predict}")
    num_ctx = options.get("num_ctx")
    if num_ctx is not None and num_ctx <= 0:
        raise InvalidRequestError(f"num_ctx must be positive, got {num_ctx}")
    stop = options.get("stop", [])
    sampling = {
        k: options[k]
        for k in (
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repeat_last_n",
            "repeat_penalty",
            "presence_penalty",
            "frequency_penalty",
            "seed",
        )
        if k in options
    }
    try:
        params = SamplingParams(
            **sampling,
            max_tokens=None if num_predict < 0 else num_predict,
            stop=[stop] if isinstance(stop, str) else list(stop),
        )
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None
    params.num_keep = max(0, options.get("num_keep", 0))
    return RequestOptions(params, num_ctx, params.num_keep, options)


def with_params(params: SamplingParams, **fields: Any) -> SamplingParams:
    """A copy with `fields` changed, checked as the constructor checks them (400s)."""
    try:
        return dataclasses.replace(params, **fields)
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None

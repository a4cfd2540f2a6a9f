"""Evaluating Go template pipelines over the API's JSON values: fields, variables,
literals and the functions Ollama's templates call."""

from __future__ import annotations

import json
import re
from typing import Any


def eval_pipe(pipe: list, dot: Any, scope: list[dict]) -> Any:
    value: Any = _MISSING
    for command in pipe:
        value = _eval_command(command, dot, scope, value)
    return None if value is _MISSING else value


_MISSING = object()


def _eval_command(command: list, dot: Any, scope: list[dict], piped: Any) -> Any:
    kind, text = command[0]
    if kind == "name" and text in FUNCS:
        args = [_eval_operand(op, dot, scope) for op in command[1:]]
        if piped is not _MISSING:
            args.append(piped)
        if text in ("and", "or"):  # Go: the first arg that decides, else the last
            for arg in args[:-1]:
                if truth(arg) == (text == "or"):
                    return arg
            return args[-1]
        return FUNCS[text](*args)
    if len(command) > 1 or piped is not _MISSING:
        raise ValueError(f"{text} is not a function")
    return _eval_operand(command[0], dot, scope)


def _eval_operand(operand: tuple, dot: Any, scope: list[dict]) -> Any:
    kind, text = operand
    if kind == "pipe":
        return eval_pipe(text, dot, scope)
    if kind == "field":
        return dot if text == "." else _lookup(dot, text)
    if kind == "var":
        name, _, chain = text.partition(".")
        value = _variable(scope, name)
        return _lookup(value, "." + chain) if chain else value
    if kind == "str":
        return text[1:-1] if text.startswith("`") else json.loads(text)
    if kind == "num":
        return float(text) if "." in text else int(text)
    if text in ("true", "false"):
        return text == "true"
    if text == "nil":
        return None
    if text in FUNCS:
        return FUNCS[text]()
    raise ValueError(f"function {text!r} not defined")


def _variable(scope: list[dict], name: str) -> Any:
    for frame in reversed(scope):
        if name in frame:
            return frame[name]
    raise ValueError(f"undefined variable {name}")


def bind(scope: list[dict], name: str, value: Any, declare: bool) -> None:
    if not declare:
        for frame in reversed(scope):
            if name in frame:
                frame[name] = value
                return
    scope[-1][name] = value


def _lookup(value: Any, chain: str) -> Any:
    for name in chain.strip(".").split("."):
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"can't read field {name} of {type(value).__name__}")
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
        value = next((value[k] for k in (name, snake, name.lower()) if k in value), None)
    return value


def truth(value: Any) -> bool:
    return bool(value) if value is not None else False


def show(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return _json(value)
    return str(value)


def _json(value: Any) -> str:
    """Go's json.Marshal: compact, with <, > and & escaped as HTML-safe \\u escapes."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _slice(value: Any, *bounds: int) -> Any:
    return value[bounds[0] : bounds[1] if len(bounds) > 1 else None]


def _printf(fmt: str, *args: Any) -> str:
    converted = re.sub(r"%[vsdq]", lambda m: "%r" if m.group() == "%q" else "%s", fmt)
    return converted % tuple(show(a) if not isinstance(a, str) else a for a in args)


FUNCS: dict[str, Any] = {
    "and": None,  # short-circuit, in _eval_command
    "or": None,
    "not": lambda v: not truth(v),
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "len": lambda v: len(v or []),
    "index": lambda v, *keys: _index(v, keys),
    "slice": _slice,
    "print": lambda *a: "".join(show(x) for x in a),
    "println": lambda *a: " ".join(show(x) for x in a) + "\n",
    "printf": _printf,
    "json": _json,
    "toJson": _json,
}


def _index(value: Any, keys: tuple) -> Any:
    for key in keys:
        value = value[key] if isinstance(value, list) else (value or {}).get(key)
    return value

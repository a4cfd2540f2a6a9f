"""Stop strings over streamed text: never leak a stop string, never hold text forever."""

from __future__ import annotations


class StopStrings:
    """Feed text pieces; get back what is safe to emit and whether a stop string appeared.

    Text that could still be the start of a stop string is held back until the
    next piece decides it; `flush` releases it when generation ends otherwise.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        text = self.held + piece
        # the stop that completes first wins, as it would arriving token by token
        found = [(i + len(s), i) for s in self.stops if (i := text.find(s)) >= 0]
        if found:
            cut = min(found)[1]
            self.held = ""
            return text[:cut], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held

"""`accordion ps --watch`: the -v table redrawn in place, with a sparkline per model."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.live import Live
from rich.text import Text

BARS = "▁▂▃▄▅▆▇█"


def spark(values: list[float], width: int = 30) -> str:
    """The last `width` values as bars scaled from 0 to their maximum."""
    values = values[-width:]
    top = max(values, default=0)
    if not values or top <= 0:
        return BARS[0] * len(values)
    return "".join(BARS[min(len(BARS) - 1, int(v / top * (len(BARS) - 1) + 0.5))] for v in values)


def watch_ps(render: Callable[[], str], interval: float, count: int) -> None:
    """Redraw in place on a terminal; elsewhere (a pipe, a test) print each frame."""
    console = Console(highlight=False)
    frames = 0

    def due() -> bool:
        return count == 0 or frames < count

    if not console.is_terminal:
        while due():
            frames += 1
            console.print(render(), soft_wrap=True)
            console.print()
            if due():
                time.sleep(interval)
        return
    with Live(Text(render()), console=console, auto_refresh=False) as live:
        try:
            while due():
                frames += 1
                live.update(Text(render()), refresh=True)
                if due():
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass

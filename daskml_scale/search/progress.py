"""The progress display of a search: trials done, running, pruned and failed, and the
best so far. One line redrawn in place in a terminal, a cell output updated in place in
a notebook, a line per finished trial when the output is a file (a log)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress", "wants_progress"]


def wants_progress(verbose: Any) -> bool:
    """``verbose="auto"``: on in a terminal or a notebook; else ``bool(verbose)``."""
    if verbose == "auto":
        return _in_notebook() or sys.stdout.isatty()
    return bool(verbose)


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules


class Progress:
    """Call :meth:`update` as trials change and :meth:`close` at the end."""

    def __init__(self, total: int, objective: str, *, enabled: bool, stream: TextIO | None = None) -> None:
        self.total = total
        self.objective = objective
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.t0 = time.perf_counter()
        self._handle: Any = None
        self._last = ""
        self._inline = enabled and not _in_notebook() and getattr(self.stream, "isatty", lambda: False)()
        self.lines: list[str] = []  # every text shown (tests read it)

    def text(self, counts: dict[str, int], best: tuple[int, float] | None) -> str:
        done = counts.get("complete", 0) + counts.get("pruned", 0) + counts.get("failed", 0)
        parts = [f"trials {done}/{self.total} done", f"{counts.get('running', 0)} running",
                 f"{counts.get('complete', 0)} complete", f"{counts.get('pruned', 0)} pruned",
                 f"{counts.get('failed', 0)} failed"]
        best_text = f"best {self.objective} {best[1]:.5g} (trial {best[0]})" if best else f"best {self.objective} -"
        return f"search: {', '.join(parts)}; {best_text}; {time.perf_counter() - self.t0:.0f}s"

    def update(self, counts: dict[str, int], best: tuple[int, float] | None, *, event: str | None = None) -> None:
        if not self.enabled:
            return
        line = self.text(counts, best)
        self.lines.append(line if event is None else f"{line} [{event}]")
        if _in_notebook():
            self._notebook(line)
        elif self._inline:
            pad = max(0, len(self._last) - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
        elif event is not None:  # a log file: one line per finished trial
            self.stream.write(f"{line} [{event}]\n")
            self.stream.flush()
        self._last = line

    def _notebook(self, line: str) -> None:
        try:
            from IPython.display import display
        except ImportError:  # pragma: no cover - ipykernel without IPython is not a notebook
            return
        if self._handle is None:
            self._handle = display({"text/plain": line}, raw=True, display_id=True)
        else:
            self._handle.update({"text/plain": line}, raw=True)

    def close(self) -> None:
        if self.enabled and self._inline and self._last:
            self.stream.write("\n")
            self.stream.flush()

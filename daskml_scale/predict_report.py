"""What :func:`~daskml_scale.predict.predict_files` did, file by file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

__all__ = ["PredictReport"]


@dataclass
class PredictReport:
    """What :func:`predict_files` did, file by file.

    Each entry is a dict ``{"input", "output", "rows", "dropped", "error"}``: ``rows``
    written and ``dropped``, the input rows the transform dropped (written with empty
    predictions under ``on_dropped="keep"``, left out under ``"omit"``), both ``None``
    for skipped and failed files; ``error`` ``None`` unless the file failed.
    """

    done: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    on_dropped: str = "keep"

    @property
    def ok(self) -> bool:
        """True when no file failed."""
        return not self.failed

    @property
    def rows(self) -> int:
        """Rows written by this run."""
        return sum(int(e["rows"] or 0) for e in self.done)

    @property
    def dropped(self) -> int:
        """Input rows of the files done that the transform dropped (see ``on_dropped``)."""
        return sum(int(e.get("dropped") or 0) for e in self.done)

    def to_frame(self) -> pd.DataFrame:
        """One row per file with a ``status`` column."""
        rows = [{"status": s, **e} for s in ("done", "skipped", "failed") for e in getattr(self, s)]
        return pd.DataFrame(rows, columns=["status", "input", "output", "rows", "dropped", "error"])

    def __str__(self) -> str:
        how = "written with empty predictions" if self.on_dropped == "keep" else "left out"
        dropped = f"; {self.dropped} dropped by the transform, {how}" if self.dropped else ""
        text = (
            f"PredictReport: {len(self.done)} done ({self.rows} rows{dropped}), {len(self.skipped)} skipped, "
            f"{len(self.failed)} failed"
        )
        for e in self.failed[:5]:
            text += f"\n  {e['input']}: {e['error']}"
        return text

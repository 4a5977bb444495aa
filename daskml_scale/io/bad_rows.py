"""Bad input rows: the ``on_bad_rows`` policy, and the report of the rows skipped.

Under ``on_bad_rows="skip"`` a reader drops malformed rows and records how many it
dropped per piece: on a worker as an event of the topic :data:`BAD_ROWS_TOPIC` in the
scheduler's event log, elsewhere in this process. :func:`bad_rows_report` gathers both.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from daskml_scale import config
from daskml_scale.exceptions import ArgumentError

__all__ = ["BAD_ROWS_TOPIC", "check_on_bad_rows", "record_skipped", "bad_rows_report"]

logger = logging.getLogger(__name__)

BAD_ROWS_TOPIC = "daskml_scale.bad-rows"

_LOCAL_BAD_ROWS: list[dict[str, Any]] = []


def check_on_bad_rows(on_bad_rows: str | None) -> str:
    """``on_bad_rows``, or the default ``daskml_scale.io.on-bad-rows`` when ``None``, checked.

    Parameters
    ----------
    on_bad_rows : {"error", "skip"} or None

    Returns
    -------
    str
        ``"error"`` or ``"skip"``.

    Raises
    ------
    ArgumentError
        It is not ``"error"`` or ``"skip"``.
    """
    on_bad_rows = on_bad_rows or config.get("io.on-bad-rows", "error")
    if on_bad_rows not in ("error", "skip"):
        raise ArgumentError(f"Expected on_bad_rows to be 'error' or 'skip'. Received: on_bad_rows={on_bad_rows!r}")
    return on_bad_rows


def record_skipped(display: str, start: int, reasons: list[str]) -> None:
    """Log and record the rows skipped in the piece of file ``display`` at byte ``start``."""
    record = {"path": display, "start": start, "skipped": len(reasons), "examples": reasons[:5]}
    logger.warning("%s: skipped %d malformed row(s), e.g. %s", display, len(reasons), reasons[0])
    try:
        from distributed import get_worker

        get_worker().log_event(BAD_ROWS_TOPIC, record)
    except ValueError:  # not on a worker (e.g. the synchronous scheduler)
        _LOCAL_BAD_ROWS.append(record)


def bad_rows_report(client: Any = None) -> pd.DataFrame:
    """Rows skipped under ``on_bad_rows="skip"``, counted per file.

    Parameters
    ----------
    client : distributed.Client, optional
        Whose workers' reports to gather (default: the current client, if any).

    Returns
    -------
    pandas.DataFrame
        Columns ``path``, ``skipped`` (rows) and ``examples`` (a few reasons).

    Examples
    --------
    >>> ddf = read_csv("data/*.csv", on_bad_rows="skip").persist()  # doctest: +SKIP
    >>> bad_rows_report()  # doctest: +SKIP
    """
    records = list(_LOCAL_BAD_ROWS)
    from daskml_scale._utils.client import default_client

    client = default_client(client)
    if client is not None:
        records += [msg for _, msg in client.get_events(BAD_ROWS_TOPIC)]
    if not records:
        return pd.DataFrame({"path": pd.Series([], dtype="str"), "skipped": pd.Series([], dtype="int64"), "examples": []})
    # a recomputed partition reports again: count each (file, byte range) once
    unique = {(r["path"], r["start"]): r for r in records}
    frame = pd.DataFrame(list(unique.values()))
    return (
        frame.groupby("path", sort=True)
        .agg(skipped=("skipped", "sum"), examples=("examples", lambda s: [e for ex in s for e in ex][:5]))
        .reset_index()
    )

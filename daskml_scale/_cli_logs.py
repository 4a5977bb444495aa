"""``daskml-scale`` without ``--verbose``: distributed's logs off the terminal.

A failing task's error is the command's one line on stderr; distributed's INFO and
WARNING lines and a worker's "Compute Failed ... Traceback" log are not shown, in this
process and on the workers of a local cluster the command starts (they write to the
same terminal).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

__all__ = ["QUIET_LEVELS", "quiet_logs", "quiet_worker_logs"]

QUIET_LEVELS = {"distributed": logging.ERROR, "distributed.worker": logging.CRITICAL}


@contextlib.contextmanager
def quiet_logs(quiet: bool) -> Iterator[None]:
    """:data:`QUIET_LEVELS` in this process while the block runs, when ``quiet`` (restored after)."""
    loggers = {name: logging.getLogger(name) for name in QUIET_LEVELS}
    old = {name: lg.level for name, lg in loggers.items()}
    if quiet:
        for name, lg in loggers.items():
            lg.setLevel(QUIET_LEVELS[name])
    try:
        yield
    finally:
        for name, lg in loggers.items():
            lg.setLevel(old[name])


def quiet_worker_logs() -> Any:
    """A worker plugin that sets :data:`QUIET_LEVELS` on the workers (and on any that
    join later); for a local cluster only: remote workers log to their own files."""
    from distributed import WorkerPlugin  # distributed loads only when a cluster is used

    levels = dict(QUIET_LEVELS)

    class QuietLogs(WorkerPlugin):
        name = "daskml-scale-cli-quiet-logs"
        idempotent = True

        def setup(self, worker: Any) -> None:
            for logger_name, level in levels.items():
                logging.getLogger(logger_name).setLevel(level)

    return QuietLogs()

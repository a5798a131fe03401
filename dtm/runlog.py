"""Dask's log lines during a ``dtm match`` command: kept for the log file, not printed.

Distributed logs a failure (a lost scheduler, a worker that died, a task that erred) as
multi-line tracebacks on stderr. The command says what happened in one or two lines
instead; :func:`capture_logs` keeps the last of Dask's log lines in memory, and a run that
stops writes them to its log file (``output_dir/dtm-error.log``) with its traceback.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Iterator

#: Loggers whose records are kept instead of printed.
LOGGERS = ("distributed", "tornado", "bokeh")
#: Most log lines kept (the last ones).
MAX_LINES = 2000

_LINES: deque[str] = deque(maxlen=MAX_LINES)


class _Keep(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            _LINES.append(self.format(record))


def captured_logs() -> list[str]:
    """The log lines kept so far (empty outside :func:`capture_logs`)."""
    return list(_LINES)


@contextlib.contextmanager
def capture_logs() -> Iterator[None]:
    """Keep the records of Dask's loggers in memory instead of printing them."""
    keep = _Keep()
    keep.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.propagate))
        logger.handlers = [keep]
        logger.propagate = False
    _LINES.clear()
    try:
        yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate

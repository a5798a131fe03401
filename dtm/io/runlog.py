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
LOGGERS = ("distributed", "tornado", "bokeh", "asyncio")
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


def keep_logs() -> list[tuple[logging.Logger, list[logging.Handler], bool]]:
    """Keep the records of Dask's loggers in memory instead of printing them, for the
    rest of the process (a client closing after a lost scheduler still logs, later);
    returns what :func:`capture_logs` restores."""
    keep = _Keep()
    keep.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = []
    names = set(LOGGERS)
    for name, item in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(item, logging.Logger) and item.handlers and name.split(".")[0] in names:
            names.add(name)  # distributed.client, tornado.application … have their own
    for name in sorted(names):
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.propagate))
        logger.handlers = [keep]
        logger.propagate = False
    _LINES.clear()
    return saved


@contextlib.contextmanager
def capture_logs() -> Iterator[None]:
    """Keep the records of Dask's loggers in memory instead of printing them, inside."""
    saved = keep_logs()
    try:
        yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate

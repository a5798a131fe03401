"""Exceptions for user mistakes.

Every error a user can cause by a bad file, a bad configuration or a bad command line is a
:class:`DtmError`. The command-line interface prints its message as one line and exits with
status 2, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DtmError(Exception):
    """Base class of all user-facing errors; the message names the input and the problem."""


class InputError(DtmError, ValueError):
    """A data file (micrograph, template, table) is missing, unreadable or invalid."""


class ConfigError(DtmError, ValueError):
    """A configuration file or option is invalid."""


class ClusterError(DtmError, RuntimeError):
    """A Dask cluster could not be reached or started."""


class MissingExtra(DtmError, ImportError):
    """A command needs an optional part of dtm that is not installed (``pip install
    'dtm[EXTRA]'``)."""


class OutputError(DtmError, RuntimeError):
    """The output directory cannot be written, or holds results that must not be replaced."""


#: Exit statuses of ``dtm match`` (documented in the README and ``dtm match --help``).
EXIT_OK = 0
#: An unexpected failure (a bug): its traceback is in the log file named on stderr.
EXIT_BUG = 1
#: A user error: bad input, configuration or command line; nothing was run.
EXIT_USER_ERROR = 2
#: The run finished, but some micrographs failed (listed on stderr and in ``run.json``).
EXIT_SOME_FAILED = 3
#: The run stopped on a failure of its cluster or output disk; ``--resume`` continues it.
EXIT_STOPPED = 4
#: Interrupted by Ctrl-C (SIGINT) / stopped by SIGTERM; ``--resume`` continues it.
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class RunStopped(Exception):
    """A run stopped by its infrastructure (scheduler or workers lost, disk full, no
    progress, …), not by its inputs: what happened in one line, and what was saved.

    Attributes
    ----------
    what
        What happened, one line.
    saved
        What the run saved (filled in by the match program), one line.
    log
        The file holding the traceback, if one was written.
    """

    def __init__(self, what: str, saved: str = "", log: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.saved = saved
        self.log = log


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run, with what the run saved (``saved``, one line)."""

    def __init__(self, saved: str = "") -> None:
        super().__init__(saved)
        self.saved = saved

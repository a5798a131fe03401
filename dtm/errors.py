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


class OutputError(DtmError, RuntimeError):
    """The output directory cannot be written, or holds results that must not be replaced."""
